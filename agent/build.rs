//! Builds the eBPF programs in `agent-ebpf/` (nightly + bpf-linker) so the binary can embed them.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    println!("cargo:rerun-if-changed={root}/common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lastgasp-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
