//! What a VM guest's console says, for the scenarios that run the static agent with its JSON
//! log: the shell functions their scripts start it with, and readers of the sections, log
//! lines and metric scrapes those functions print.

use serde_json::Value;

/// Shell functions for a scenario's script (after mounting bpffs and debugfs):
/// - `start_agent ARGS...`: `lastgasp --log-format json agent --standalone --node-name
///   vm-node --metrics-addr 127.0.0.1:9465 ARGS...` in the background, its log in
///   `/tmp/agent.log`; returns once it serves metrics;
/// - `wait_count PATTERN N SECONDS`, `wait_log PATTERN SECONDS`: until the log has N lines
///   (one line) with PATTERN; fail early if the agent is gone;
/// - `metrics TAG`: its `lastgasp_` metric lines, each prefixed `metrics[TAG]: `;
/// - `stop_agent TAG`: SIGTERM, then its log, each line prefixed `agent-log[TAG]: `;
/// - `fail TAG`: metrics and log of a run gone wrong, and its `lastgasp-vm: end TAG`.
pub const AGENT_FUNCTIONS: &str = r#"mkdir -p /sys/fs/bpf /run
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
# wait_count PATTERN N SECONDS: until the agent's log has N lines with PATTERN; fails early
# if the agent is gone.
wait_count() {
    tries=0
    while [ "$(grep -c "$1" /tmp/agent.log)" -lt "$2" ]; do
        tries=$((tries + 1))
        if ! kill -0 "$agent" 2> /dev/null; then
            echo "lastgasp-vm: the agent exited while waiting for $1"
            return 1
        fi
        if [ "$tries" -gt $(($3 * 10)) ]; then
            echo "lastgasp-vm: timed out waiting for $2 lines of $1 in the agent log"
            return 1
        fi
        sleep 0.1
    done
}
# wait_log PATTERN SECONDS: until the agent's log has PATTERN.
wait_log() {
    wait_count "$1" 1 "$2"
}
# metrics TAG: the agent's metrics, each line prefixed with "metrics[TAG]: ".
metrics() {
    wget -qO- http://127.0.0.1:9465/metrics | grep '^lastgasp_' | sed "s/^/metrics[$1]: /"
}
# start_agent ARGS...: the agent in the background, its JSON log in /tmp/agent.log. The log
# is emptied here, before the agent starts, and the agent appends to it: nothing truncates it
# once a wait may be reading it.
start_agent() {
    : > /tmp/agent.log
    /bin/lastgasp --log-format json agent --standalone --node-name vm-node \
        --metrics-addr 127.0.0.1:9465 "$@" >> /tmp/agent.log 2>&1 &
    agent=$!
    wait_log 'serving metrics' 120
}
# stop_agent TAG: SIGTERM, then its log with each line prefixed with "agent-log[TAG]: ".
stop_agent() {
    kill "$agent" 2> /dev/null
    wait "$agent"
    sed "s/^/agent-log[$1]: /" /tmp/agent.log
}
# fail TAG: the run went wrong; show the agent's log and end the run.
fail() {
    metrics "$1-failed"
    stop_agent "$1"
    echo "lastgasp-vm: end $1"
}
"#;

/// The console lines between `lastgasp-vm: begin <tag>` and `lastgasp-vm: end <tag>`.
pub fn section<'a>(console: &'a str, tag: &str) -> Vec<&'a str> {
    let begin = format!("lastgasp-vm: begin {tag}");
    let end = format!("lastgasp-vm: end {tag}");
    let lines: Vec<&str> = console.lines().collect();
    let start = lines
        .iter()
        .position(|line| has_marker(line, &begin))
        .unwrap_or_else(|| panic!("no {begin:?} on the console:\n{console}"));
    let stop = lines[start..]
        .iter()
        .position(|line| has_marker(line, &end))
        .unwrap_or_else(|| panic!("no {end:?} on the console:\n{console}"));
    lines[start..start + stop].to_vec()
}

/// Whether `line` has the script's `marker` line in it. The kernel writes to the same serial
/// console, so its own lines can come before the marker and after it on one line
/// (`lastgasp-vm: begin x[    3.66] tsc: ...`), but not another marker that merely starts
/// the same way (`... begin x2`).
fn has_marker(line: &str, marker: &str) -> bool {
    line.match_indices(marker).any(|(at, _)| {
        let rest = &line[at + marker.len()..];
        rest.is_empty() || rest.starts_with('[')
    })
}

/// The agent's JSON log lines of a run (`agent-log[<tag>]: ` on the console).
pub fn agent_log(lines: &[&str], tag: &str) -> Vec<Value> {
    let prefix = format!("agent-log[{tag}]: ");
    lines
        .iter()
        .filter_map(|line| line.split_once(&prefix).map(|(_, json)| json))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

pub fn events<'a>(log: &'a [Value], kind: &str) -> Vec<&'a Value> {
    log.iter().filter(|entry| entry["kind"] == kind).collect()
}

/// The sum of metric `name` over its series with all of `labels` in the scrape tagged `tag`;
/// `None` when it has no such series.
pub fn metric(lines: &[&str], tag: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("metrics[{tag}]: ");
    lines
        .iter()
        .filter_map(|line| line.split_once(&prefix).map(|(_, sample)| sample))
        .filter_map(|sample| {
            let (series, value) = sample.rsplit_once(' ')?;
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            let matches = series_name == name
                && labels
                    .iter()
                    .all(|(key, value)| series_labels.contains(&format!("{key}=\"{value}\"")));
            if matches {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .reduce(|sum, value| sum + value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_survive_kernel_lines_on_the_marker_line() {
        let console = "[    3.1] Run /init as init process\n\
            lastgasp-vm: begin run2\nnot this one\nlastgasp-vm: end run2\n\
            lastgasp-vm: begin run[    3.66] tsc: Refined TSC clocksource calibration\n\
            inside\n[    4.0] oom-kill: ...lastgasp-vm: end run\nafter\n";
        let lines = section(console, "run");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("lastgasp-vm: begin run["));
        assert_eq!(lines[1], "inside");
    }
}
