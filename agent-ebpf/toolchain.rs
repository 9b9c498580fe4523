//! The pinned nightly of `rust-toolchain.toml` beside this file, for the host-side code that
//! builds or lints the eBPF programs (`agent/build.rs` and xtask include this file by path).

/// The `channel` of `rust-toolchain.toml`, e.g. `nightly-2026-05-19`.
pub fn ebpf_toolchain() -> &'static str {
    include_str!("rust-toolchain.toml")
        .lines()
        .find_map(|line| {
            let value = line
                .strip_prefix("channel")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"'))
        })
        .expect("agent-ebpf/rust-toolchain.toml names a channel")
}
