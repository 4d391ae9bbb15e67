//! No two files of a crate under host/ import each other in a circle.
//!
//! Each file is a module (`lib.rs`/`main.rs` the root, `a.rs` and
//! `a/mod.rs` the module `a`, `a/b.rs` the module `a::b`). A file depends on
//! the module that each path it names in code resolves to: `crate::…`,
//! `super::…`, `self::…`, and the child modules it declares. A path is
//! resolved to the longest prefix that is a module file. A file may use
//! what the modules it is declared in define (its parent and their
//! parents, the crate root, which is also the crate's facade): no edge
//! goes to an ancestor, as a module hierarchy is for exactly that. Every
//! other dependency is an edge: between siblings, across subtrees, and from
//! a parent to its children. Declaring a child module is not a dependency;
//! using it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Result;

/// The module path of `file` relative to the crate's `src`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_owned()),
    }
    parts
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths (as segments) a line of code names starting at `prefix`
/// (`crate`, `super` or `self`, or a child module), `use` groups expanded
/// one level: `crate::{a, b::c}` gives `crate::a` and `crate::b::c`.
fn paths_in(line: &str, heads: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if !starts_word || !is_ident(chars[i]) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && is_ident(chars[j]) {
            j += 1;
        }
        let word: String = chars[i..j].iter().collect();
        if !heads.contains(&word) || !line[byte(&chars, j)..].starts_with("::") {
            i = j;
            continue;
        }
        // Read the path: segments joined by `::`, possibly ending in a group.
        let mut segments = vec![word];
        let mut k = j;
        loop {
            let rest = &line[byte(&chars, k)..];
            if !rest.starts_with("::") {
                break;
            }
            k += 2;
            if chars.get(k) == Some(&'{') {
                let close = chars[k..].iter().position(|c| *c == '}').map(|p| k + p);
                let inner: String = chars[k + 1..close.unwrap_or(chars.len())].iter().collect();
                for item in inner.split(',') {
                    let item: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.trim().trim_start_matches('{').to_owned())
                        .filter(|s| !s.is_empty())
                        .collect();
                    let mut path = segments.clone();
                    path.extend(item);
                    found.push(path);
                }
                k = close.unwrap_or(chars.len());
                segments.clear();
                break;
            }
            let mut e = k;
            while e < chars.len() && is_ident(chars[e]) {
                e += 1;
            }
            if e == k {
                break;
            }
            segments.push(chars[k..e].iter().collect());
            k = e;
        }
        if !segments.is_empty() {
            found.push(segments);
        }
        i = k.max(j);
    }
    found
}

fn byte(chars: &[char], at: usize) -> usize {
    chars[..at.min(chars.len())]
        .iter()
        .map(|c| c.len_utf8())
        .sum()
}

/// The child modules `text` declares (`mod x;`, `pub mod x;`, ...).
fn declared_children(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("mod ")
                .or_else(|| line.split_once(" mod ").map(|(_, r)| r))?;
            let name = rest.strip_suffix(';')?;
            name.chars().all(is_ident).then(|| name.to_owned())
        })
        .collect()
}

/// The cycles among the files of the crate whose sources are in `src`, as
/// lists of files relative to `root`.
pub fn cycles(root: &Path, src: &Path) -> Result<Vec<Vec<String>>> {
    let mut files = Vec::new();
    crate::invariants::rust_files(src, &mut files)?;
    // A binary's `main.rs` beside `lib.rs` is a crate of its own.
    let has_lib = src.join("lib.rs").is_file();
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .filter(|file| {
            !(has_lib
                && file
                    .strip_prefix(src)
                    .is_ok_and(|r| r == Path::new("main.rs")))
        })
        .map(|file| (module_of(src, file), file.clone()))
        .collect();
    let resolve = |path: &[String]| -> Option<Vec<String>> {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| modules.contains_key(prefix))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file)?;
        // Tests may reach anywhere: only the code above them counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let children = declared_children(code);
        let mut heads: BTreeSet<String> = ["crate", "super", "self"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        heads.extend(children.iter().cloned());
        let out = edges.entry(module.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for path in paths_in(line, &heads) {
                let (base, rest): (Vec<String>, &[String]) = match path[0].as_str() {
                    "crate" => (Vec::new(), &path[1..]),
                    "self" => (module.clone(), &path[1..]),
                    "super" => {
                        let mut base = module.clone();
                        let mut rest = &path[..];
                        while rest.first().is_some_and(|s| s == "super") {
                            base.pop();
                            rest = &rest[1..];
                        }
                        (base, rest)
                    }
                    _ => (module.clone(), &path[..]),
                };
                let mut full = base;
                full.extend(rest.iter().cloned());
                if let Some(target) = resolve(&full)
                    && !module.starts_with(&target)
                {
                    out.insert(target);
                }
            }
        }
    }
    // Depth-first search for back edges.
    let mut found = Vec::new();
    let mut state: BTreeMap<&Vec<String>, u8> = BTreeMap::new();
    let mut stack: Vec<&Vec<String>> = Vec::new();
    fn visit<'a>(
        node: &'a Vec<String>,
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        stack: &mut Vec<&'a Vec<String>>,
        found: &mut Vec<Vec<Vec<String>>>,
    ) {
        state.insert(node, 1);
        stack.push(node);
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next) {
                Some(1) => {
                    let at = stack.iter().position(|n| *n == next).unwrap_or(0);
                    let mut cycle: Vec<Vec<String>> =
                        stack[at..].iter().map(|n| (*n).clone()).collect();
                    cycle.push(next.clone());
                    found.push(cycle);
                }
                Some(_) => {}
                None => visit(next, edges, state, stack, found),
            }
        }
        stack.pop();
        state.insert(node, 2);
    }
    for node in edges.keys() {
        if !state.contains_key(node) {
            visit(node, &edges, &mut state, &mut stack, &mut found);
        }
    }
    let name = |module: &Vec<String>| {
        modules
            .get(module)
            .map(|file| {
                file.strip_prefix(root)
                    .unwrap_or(file)
                    .display()
                    .to_string()
            })
            .unwrap_or_default()
    };
    Ok(found
        .into_iter()
        .map(|cycle| cycle.iter().map(name).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(extra: &[&str]) -> BTreeSet<String> {
        ["crate", "super", "self"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    }

    #[test]
    fn paths_and_groups_are_read() {
        let got = paths_in(
            "use crate::{grpc::pb, ports::PeerAddr}; let x = super::types::Inner::new(); y::z();",
            &heads(&["y"]),
        );
        let want: Vec<Vec<&str>> = vec![
            vec!["crate", "grpc", "pb"],
            vec!["crate", "ports", "PeerAddr"],
            vec!["super", "types", "Inner", "new"],
            vec!["y", "z"],
        ];
        assert_eq!(got, want);
        assert!(paths_in("let a = my_crate::x; b::c", &heads(&[])).is_empty());
    }

    #[test]
    fn a_circle_between_two_files_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
        std::fs::write(src.join("a/mod.rs"), "mod c;\nuse c::X;\n").unwrap();
        std::fs::write(src.join("a/c.rs"), "use crate::b::Y;\nuse super::W;\n").unwrap();
        std::fs::write(src.join("b.rs"), "use crate::a::Z;\n").unwrap();
        let found = cycles(dir.path(), &src).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains(&"src/b.rs".to_owned()), "{found:?}");
        std::fs::write(src.join("b.rs"), "pub struct Y;\n").unwrap();
        assert!(cycles(dir.path(), &src).unwrap().is_empty());
    }

    #[test]
    fn the_host_crates_have_no_circles() {
        let root = crate::project_root();
        for src in crate::invariants::host_sources(&root).unwrap() {
            let found = cycles(&root, &src).unwrap();
            assert!(found.is_empty(), "{}: {found:?}", src.display());
        }
    }
}
