#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plinth_tests::fuzzing::compute_request(data);
});
