//! The fuzz corpora (`fuzz/corpus/<target>/`) and the inputs that once
//! crashed a target (`fuzz/regressions/<target>/`), replayed through the
//! same harness the fuzzers run (`plinth_tests::fuzzing`). A panic is a
//! failure; so is a target whose corpus is missing, and a seed named
//! `ok_*` that its decoder refuses (the seeds that exercise the checks on
//! accepted input).

use std::path::Path;

use plinth_tests::fuzzing::TARGETS;

#[test]
fn every_corpus_input_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = Vec::new();
    for (target, run) in TARGETS {
        let mut count = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let accepted = std::panic::catch_unwind(|| run(&data))
                    .unwrap_or_else(|_| panic!("{target} panicked on {}", path.display()));
                let name = path.file_name().unwrap().to_string_lossy();
                assert!(
                    !name.starts_with("ok_") || accepted > 0,
                    "{target}: the seed {name} should decode"
                );
                count += 1;
            }
        }
        assert!(count > 0, "no corpus for the fuzz target {target}");
        replayed.push(format!("{target}: {count}"));
    }
    println!("replayed {}", replayed.join(", "));
}
