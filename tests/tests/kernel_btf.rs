//! The agent's BTF parser against this machine's kernel BTF (`/sys/kernel/btf/vmlinux`): the
//! unit tests use a small fixture; this checks the real thing, whatever kernel runs here.

use std::time::Instant;

use lastgasp::agent::btf::{Btf, BtfError, cgroup_offsets, cgroup_subsys_id, kernel_offsets};

fn vmlinux() -> Btf {
    Btf::from_sys_fs().expect("this machine's kernel BTF")
}

#[test]
fn parses_this_kernels_btf_quickly() {
    let bytes = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
    let len = bytes.len();
    let start = Instant::now();
    let btf = Btf::parse(bytes).unwrap();
    let elapsed = start.elapsed();
    println!("parsed {len} bytes of vmlinux BTF in {elapsed:?}");
    assert!(len > 1 << 20, "{len} bytes: not a whole kernel's BTF");
    kernel_offsets(&btf).unwrap();
}

#[test]
fn this_kernels_offsets() {
    let off = kernel_offsets(&vmlinux()).unwrap();
    println!("{off:#?}");
    // Stable across kernel versions.
    assert_eq!(off.fdtable_max_fds, 0);
    assert_eq!(off.fdtable_fd, 8);
    assert_eq!(off.sock_family, 16);
    assert_eq!(off.mm_struct_env_end, off.mm_struct_env_start + 8);
    assert!(off.task_struct_files > 0 && off.task_struct_mm > 0 && off.sock_protocol > 16);
}

#[test]
fn this_kernels_cgroup_offsets() {
    let btf = vmlinux();
    let off = cgroup_offsets(&btf).unwrap();
    println!("{off:#?}");
    // si_code follows si_signo and si_errno in every kernel's siginfo.
    assert_eq!(off.kernel_siginfo_code, 8);
    assert_eq!(off.task_struct_tgid, off.task_struct_pid + 4);
    assert_eq!(off.upid_size, 16);
    // The unified hierarchy has no controller id; the v1 ones do, below the array's size.
    assert!(cgroup_subsys_id(&btf, "memory").unwrap() < 16);
    assert!(cgroup_subsys_id(&btf, "no_such_controller").is_err());
}

#[test]
fn this_kernels_anonymous_and_dotted_members() {
    let btf = vmlinux();
    // mm_struct's fields all sit in an anonymous struct.
    assert!(btf.member_offset("mm_struct", "env_start").unwrap() > 0);
    assert_eq!(btf.member_size("mm_struct", "env_start").unwrap(), 8);
    assert_eq!(
        btf.member_offset("sock", "__sk_common.skc_family").unwrap(),
        btf.member_offset("sock_common", "skc_family").unwrap()
    );
    assert_eq!(btf.member_size("sock", "sk_protocol").unwrap(), 2);
    assert_eq!(btf.member_size("task_struct", "files").unwrap(), 8);
}

#[test]
fn this_kernels_error_messages() {
    let btf = vmlinux();
    let err = |t: &str, f: &str| btf.member_offset(t, f).unwrap_err().to_string();
    assert_eq!(
        err("fdtable_nope", "fd"),
        r#"BTF has no struct named "fdtable_nope""#
    );
    assert_eq!(
        err("sock", "sk_protocl"),
        r#"struct "sock" has no member "sk_protocl""#
    );
    assert_eq!(
        err("task_struct", "sched_reset_on_fork"),
        r#"struct "task_struct": member "sched_reset_on_fork" is a bitfield, not byte-addressable"#
    );
    assert!(matches!(
        btf.member_size("task_struct", "sched_reset_on_fork"),
        Err(BtfError::BitfieldMember { .. })
    ));
}
