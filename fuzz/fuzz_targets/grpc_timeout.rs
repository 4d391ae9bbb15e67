#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plinth_tests::fuzzing::grpc_timeout(data);
});
