//! Builds the eBPF programs in `agent-ebpf/` (the pinned nightly + bpf-linker) so the binary
//! can embed them.

#[path = "../agent-ebpf/toolchain.rs"]
mod toolchain;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!("cargo:rerun-if-changed={root}/common");
    println!("cargo:rerun-if-changed={root}/rust-toolchain.toml");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lastgasp-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain::ebpf_toolchain()),
    )
}
