//! Builds the eBPF programs in `agent-ebpf/` (the pinned nightly + bpf-linker) so the binary
//! can embed them.

#[path = "../agent-ebpf/toolchain.rs"]
mod toolchain;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!("cargo:rerun-if-changed={root}/common");
    println!("cargo:rerun-if-changed={root}/rust-toolchain.toml");
    // aya-build turns every line the inner cargo prints into a `cargo:warning`; without its
    // progress lines, what is left (compiler or linker warnings) stands out.
    // SAFETY: the build script is single-threaded here; the inner cargo inherits it.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lastgasp-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain::ebpf_toolchain()),
    )
}
