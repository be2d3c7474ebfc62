//! `weft-bench NAME`: the benchmarks `cargo xtask bench NAME` runs (as root).

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if !weft_tests::root_or_skip(&format!("bench {name}")) {
        std::process::exit(1);
    }
    match name.as_str() {
        "datapath" => weft_tests::bench::datapath::run_bench(
            env_u32("WEFT_BENCH_ROUNDS", 5),
            env_u32("WEFT_BENCH_SECONDS", 3),
        ),
        "attach" => weft_tests::bench::attach::run_bench(env_u32("WEFT_BENCH_RUNS", 20)),
        "mesh" => weft_tests::bench::mesh::run_bench(),
        "ipam" => weft_tests::bench::ipam::run_bench(),
        "dns" => weft_tests::bench::dns::run_bench(env_u32("WEFT_BENCH_ROUNDS", 3), env_u32("WEFT_BENCH_SECONDS", 3)),
        other => {
            eprintln!("unknown benchmark {other:?}; known: datapath, mesh, ipam, dns, attach");
            std::process::exit(64);
        }
    }
}
