//! A process "in a container" without a container runtime: a real cgroup named as kubelet and
//! containerd name it, its Pod in the API server, and a process in it that hangs in
//! netlink `recvfrom`, for the tests of the agent's pod attribution.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

/// A cgroup made for a test, in the cgroupfs layout kubelet uses
/// (`kubepods/<qos>/pod<uid>/<container id>`), removed when dropped.
pub struct ContainerCgroup {
    dirs: Vec<PathBuf>,
}

impl ContainerCgroup {
    pub fn create(container_id: &str) -> Self {
        // A v1 hierarchy where the host has them, else the unified one.
        Self::create_in(
            &[
                "/sys/fs/cgroup/pids",
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup",
            ],
            container_id,
        )
    }

    /// In the memory controller's hierarchy: the v1 one where the host has it, else the
    /// unified one (with the memory controller enabled below its root).
    pub fn create_for_memory(container_id: &str) -> Self {
        let cgroup = Self::create_in(&["/sys/fs/cgroup/memory", "/sys/fs/cgroup"], container_id);
        if !cgroup.dirs[0].join("memory.limit_in_bytes").exists() {
            // cgroup v2: each level hands the controller down to the next, from kubepods.
            for dir in cgroup.dirs[1..].iter().rev() {
                std::fs::write(dir.join("cgroup.subtree_control"), "+memory")
                    .expect("enable the memory controller");
            }
        }
        cgroup
    }

    /// In the unified (cgroup v2) hierarchy: `/sys/fs/cgroup/unified` on a hybrid host, else
    /// `/sys/fs/cgroup`.
    pub fn create_unified(container_id: &str) -> Self {
        Self::create_in(&["/sys/fs/cgroup/unified", "/sys/fs/cgroup"], container_id)
    }

    /// In the first of `roots` that is a cgroup hierarchy.
    fn create_in(roots: &[&str], container_id: &str) -> Self {
        let root = roots
            .iter()
            .map(PathBuf::from)
            .find(|root| root.join("cgroup.procs").exists())
            .expect("a writable cgroup hierarchy");
        let kubepods = root.join(format!("kubepods-lastgasp-{}", std::process::id()));
        let pod = kubepods
            .join("besteffort")
            .join("pod0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        let container = pod.join(container_id);
        std::fs::create_dir_all(&container).expect("create the test cgroup");
        Self {
            dirs: vec![
                container,
                pod.clone(),
                pod.parent().unwrap().to_owned(),
                kubepods,
            ],
        }
    }

    /// Its `cgroup.procs`: a process that writes its pid here joins the cgroup.
    pub fn procs(&self) -> PathBuf {
        self.dirs[0].join("cgroup.procs")
    }

    /// The container's cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// The `kubepods` root above it.
    pub fn kubepods(&self) -> &Path {
        &self.dirs[3]
    }

    /// Limits the container's memory to `bytes` (`memory.limit_in_bytes` on cgroup v1,
    /// `memory.max` on v2).
    pub fn limit_memory(&self, bytes: u64) {
        let v1 = self.dirs[0].join("memory.limit_in_bytes");
        let file = if v1.exists() {
            v1
        } else {
            self.dirs[0].join("memory.max")
        };
        std::fs::write(&file, bytes.to_string()).expect("set the memory limit");
    }

    /// `sh -c <script>` run in this cgroup: the shell joins it first, so `script` and what it
    /// starts are the container's processes (the shell is its first, `exec` keeps it so).
    pub fn run_sh(&self, script: &str) -> Child {
        let joined = format!("echo $$ > '{}' && {script}", self.procs().display());
        Command::new("sh")
            .args(["-c", &joined])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh")
    }

    /// A python3 process (comm `python3`) that joins this cgroup, then blocks in `recvfrom`
    /// on a NETLINK_ROUTE socket for `seconds`.
    pub fn hang_in_netlink_recv(&self, seconds: u32) -> Child {
        let script = format!(
            "import os, socket, struct\n\
             open({procs:?}, 'w').write(str(os.getpid()))\n\
             s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n\
             s.bind((0, 0))\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack('ll', {seconds}, 0))\n\
             try:\n    s.recv(64)\nexcept OSError:\n    pass\n",
            procs = self.procs().display().to_string()
        );
        Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3")
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A Pod on `node` whose container `container` runs with `container_id` (containerd).
pub fn pod_with_container(
    namespace: &str,
    name: &str,
    node: &str,
    container: &str,
    container_id: &str,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "nodeName": node, "containers": [{ "name": container, "image": "app" }] },
        "status": { "containerStatuses": [{
            "name": container, "containerID": format!("containerd://{container_id}"),
            "image": "app", "imageID": "", "ready": true, "restartCount": 0
        }]}
    })
}
