//! The `lastgasp` binary's command line: help text and the usage errors it stops at before
//! starting anything (no root needed; `cli_agent.rs` runs the agent).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lastgasp");

#[test]
fn help_describes_every_agent_flag() {
    let output = Command::new(BIN)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--standalone",
        "--node-name",
        "--metrics-addr",
        "--controller",
        "--controller-service",
        "--auth-key-file",
        "--netlink-hang-threshold",
        "--cni-bin-dir",
        "--cni-stuck-threshold",
        "--pod-cgroup-root",
        "--netconsole-target",
        "--pstore-dir",
        "--state-dir",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(
        help.contains("[default: lastgasp-system/lastgasp-controller-ingest]"),
        "{help}"
    );
    assert!(help.contains("IPv4 only"), "{help}");
}

#[test]
fn a_fixed_controller_and_a_controller_service_are_exclusive() {
    for args in [
        &[
            "agent",
            "--controller",
            "127.0.0.1:6667",
            "--controller-service",
            "ns/svc",
        ][..],
        &["agent", "--standalone", "--controller-service", "ns/svc"][..],
        &["agent", "--controller-service", "no-namespace"][..],
    ] {
        let output = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?} is refused as usage"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("cannot be used with") || stderr.contains("is not NAMESPACE/NAME"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn netconsole_targets_must_be_ipv4() {
    for (value, why) in [
        ("[::1]:6666", "netconsole targets are IPv4 only"),
        ("10.0.0.1", "not an IPv4 address:port"),
    ] {
        let output = Command::new(BIN)
            .args(["agent", "--standalone", "--netconsole-target", value])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains("--netconsole-target") && stderr.contains(why),
            "{value}: {stderr}"
        );
    }
}

#[test]
fn the_controller_refuses_to_start_without_a_real_key() {
    // No key: a usage error unless unsigned reports are accepted explicitly.
    let output = Command::new(BIN).arg("controller").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--auth-key-file"), "{stderr}");

    // An empty or short key is refused before anything starts.
    let dir = std::env::temp_dir().join(format!("lastgasp-cli-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, key) in [("empty", &b""[..]), ("short", &b"0123456789abcde"[..])] {
        let path = dir.join(name);
        std::fs::write(&path, key).unwrap();
        let output = Command::new(BIN)
            .args(["controller", "--auth-key-file"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{name} key refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("the key has {} bytes; at least 16", key.len())),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
