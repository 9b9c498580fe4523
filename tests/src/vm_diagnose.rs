//! Where a guest's CPUs are when it stops making progress: each vCPU's instruction pointer and
//! the kernel addresses on its stack, named, read through qemu's QMP socket. A stack scan,
//! like the kernel's `?` frames: every word that points into kernel text is shown, so stale
//! return addresses come with the live ones.
//!
//! Names come from the guest's own `/proc/kallsyms` (KASLR moves the kernel and its modules
//! on every boot, and Debian's packages ship no real `System.map`), which the guest sends to a
//! [`KallsymsReceiver`] on the host before anything goes wrong: [`send_kallsyms`].

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener},
    os::unix::net::UnixStream,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Where the x86_64 kernel's text and modules live.
const KERNEL_TEXT_BASE: u64 = 0xffff_ffff_8000_0000;
/// Where x86_64's kernel addresses begin (the direct map, vmalloc'd stacks, ...).
const KERNEL_DATA: u64 = 0xffff_8000_0000_0000;
/// The most stack words read from a stack pointer: a kernel stack is 16 KiB, and the read
/// stops at the guard page above its top.
const STACK_WORDS: usize = 2048;
/// x86_64's `THREAD_SIZE`: task stacks are this big and aligned to it.
const TASK_STACK_BYTES: u64 = 16 << 10;
/// The guest's last line to the receiver.
const END_OF_KALLSYMS: &str = "lastgasp-vm: end of kallsyms";

/// Guest shell that sends its `/proc/kallsyms` to the receiver on the host's `port`, through
/// qemu's user-mode network (`host` is the host's loopback as the guest sees it); returns once
/// the host has it all.
pub fn send_kallsyms(host: &str, port: u16) -> String {
    format!("(cat /proc/kallsyms; echo \"{END_OF_KALLSYMS}\") | nc {host} {port}\n")
}

/// Takes the `/proc/kallsyms` guests send (one guest at a time) on a loopback port.
pub struct KallsymsReceiver {
    pub port: u16,
    latest: Arc<Mutex<Option<String>>>,
}

impl KallsymsReceiver {
    pub fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let latest = Arc::new(Mutex::new(None));
        let keep = latest.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let mut text = String::new();
                for line in BufReader::new(&stream).lines().map_while(Result::ok) {
                    if line == END_OF_KALLSYMS {
                        break;
                    }
                    text += &line;
                    text.push('\n');
                }
                // Closing the connection ends the guest's `nc`.
                drop(stream);
                *keep.lock().unwrap() = Some(text);
            }
        });
        Self { port, latest }
    }

    /// The symbols of the last guest that sent them, taken.
    pub fn take(&self) -> Option<Symbols> {
        self.latest
            .lock()
            .unwrap()
            .take()
            .map(|text| Symbols::from_kallsyms(&text))
    }
}

/// Takes TCP connections on a loopback port and discards what they send: traffic for a guest
/// to make.
pub struct TcpSink {
    pub port: u16,
}

impl TcpSink {
    pub fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut buffer = [0; 65536];
                    while let Ok(1..) = stream.read(&mut buffer) {}
                });
            }
        });
        Self { port }
    }
}

/// Kernel text symbols by address, for naming stack words.
#[derive(Default)]
pub struct Symbols {
    /// Sorted by address.
    text: Vec<(u64, String)>,
}

impl Symbols {
    /// From `/proc/kallsyms` (`<address> <type> <name> [<module>]`): its text symbols.
    pub fn from_kallsyms(kallsyms: &str) -> Self {
        let mut text: Vec<(u64, String)> = kallsyms
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let address = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (address, name.to_owned()))
            })
            .collect();
        text.sort_unstable();
        Self { text }
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// `function+0xoffset` for an address in kernel text, if a symbol is within 64 KiB below.
    pub fn name(&self, address: u64) -> Option<String> {
        if address < KERNEL_TEXT_BASE {
            return None;
        }
        let at = self.text.partition_point(|(start, _)| *start <= address);
        let (start, name) = self.text.get(at.checked_sub(1)?)?;
        let offset = address - start;
        (offset < 0x10000).then(|| format!("{name}+{offset:#x}"))
    }
}

/// One vCPU: its instruction pointer and the named words of its stack, innermost first.
#[derive(Debug)]
pub struct CpuState {
    pub cpu: usize,
    pub rip: String,
    pub halted: bool,
    pub stack: Vec<String>,
}

/// Each vCPU's state, read through the QMP socket at `qmp`.
pub fn cpu_states(qmp: &Path, symbols: &Symbols) -> anyhow::Result<Vec<CpuState>> {
    let mut monitor = Qmp::connect(qmp)?;
    let registers = monitor.human("info registers -a", None)?;
    let mut states = Vec::new();
    for (cpu, block) in registers.split("CPU#").skip(1).enumerate() {
        let register = |name: &str| -> Option<u64> {
            let (_, rest) = block.split_once(&format!("{name}="))?;
            u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
        };
        let (Some(rip), Some(rsp)) = (register("RIP"), register("RSP")) else {
            bail!("no RIP or RSP for CPU {cpu} in {block:?}");
        };
        let words = stack_words(&mut monitor, cpu, rsp, STACK_WORDS)?;
        let mut stack: Vec<String> = words.iter().filter_map(|&w| symbols.name(w)).collect();
        // An interrupt taken in task context runs on the CPU's IRQ stack, whose top word is
        // the interrupted stack's pointer: its frames follow a `|`. That stack is vmalloc'd,
        // or inside the kernel image for CPU 0's idle task (`init_stack`), so any aligned
        // kernel address that is not code counts.
        if let Some(&previous) = words
            .last()
            .filter(|&&w| w >= KERNEL_DATA && w % 8 == 0 && symbols.name(w).is_none())
        {
            stack.push("|".into());
            // A task stack ends at a 16 KiB boundary; `init_stack` has no guard page above.
            let to_top = ((previous | (TASK_STACK_BYTES - 1)) + 1 - previous) / 8;
            let below = stack_words(&mut monitor, cpu, previous, to_top as usize)?;
            stack.extend(below.iter().filter_map(|&w| symbols.name(w)));
        }
        states.push(CpuState {
            cpu,
            rip: symbols.name(rip).unwrap_or_else(|| format!("{rip:#x}")),
            halted: block.contains("HLT=1"),
            stack,
        });
    }
    Ok(states)
}

/// vCPU `cpu`'s memory from `address` up: `count` words, or fewer up to the first page it
/// cannot read (a stack's guard page).
fn stack_words(
    monitor: &mut Qmp,
    cpu: usize,
    address: u64,
    count: usize,
) -> anyhow::Result<Vec<u64>> {
    let memory = monitor.human(&format!("x/{count}gx {address:#x}"), Some(cpu))?;
    Ok(memory
        .lines()
        .filter_map(|line| line.split_once(": ").map(|(_, words)| words))
        .flat_map(str::split_whitespace)
        .filter_map(|word| u64::from_str_radix(word.strip_prefix("0x")?, 16).ok())
        .collect())
}

/// A QMP connection in command mode.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("connecting to {path:?}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        qmp.read()?; // the greeting
        qmp.execute(json!({ "execute": "qmp_capabilities" }))?;
        Ok(qmp)
    }

    /// A human monitor command's output, on vCPU `cpu` where it matters (memory reads).
    fn human(&mut self, command: &str, cpu: Option<usize>) -> anyhow::Result<String> {
        let mut arguments = json!({ "command-line": command });
        if let Some(cpu) = cpu {
            arguments["cpu-index"] = cpu.into();
        }
        let value = self.execute(json!({
            "execute": "human-monitor-command",
            "arguments": arguments,
        }))?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// Sends a command and returns its `return`, skipping the events before it.
    fn execute(&mut self, command: Value) -> anyhow::Result<Value> {
        writeln!(self.writer, "{command}")?;
        loop {
            let mut reply = self.read()?;
            if let Some(error) = reply.get("error") {
                bail!("QMP {command}: {error}");
            }
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
        }
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("qemu closed the QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP reply {line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_text_addresses_of_the_kernel_and_its_modules() {
        let symbols = Symbols::from_kallsyms(
            "ffffffffab234000 T netpoll_poll_dev\nffffffffab234400 t poll_napi\n\
             ffffffffac000000 D some_data\nffffffffc0401000 t virtnet_poll_tx\t[virtio_net]\n",
        );
        assert_eq!(symbols.len(), 3);
        assert_eq!(
            symbols.name(0xffff_ffff_ab23_4410).as_deref(),
            Some("poll_napi+0x10")
        );
        assert_eq!(
            symbols.name(0xffff_ffff_c040_1234).as_deref(),
            Some("virtnet_poll_tx+0x234")
        );
        assert_eq!(symbols.name(0xffff_ffff_ab23_3000), None);
        assert_eq!(symbols.name(0x1234), None);
    }
}
