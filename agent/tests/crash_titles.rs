//! Measures `crash_title` against syzkaller's titles for the development set
//! of real console logs (see the README next to the data) and asserts the
//! targets. Run with `--nocapture` to see the table and every mismatch;
//! `CRASH_TITLE_ID=<id>` also prints the full result for that log. A second
//! test checks that lines before a report are scanned without allocating.
//!
//! Comparisons, after replacing each digit run by `NUM` as syzkaller does:
//! - kind: the title without its last ` in <culprit>` part, against the
//!   title and every `alt` title;
//! - culprit: the part after the last ` in `, over logs whose title names a
//!   function (not `corrupted`);
//! - exact: the whole report title.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use lastgasp::kernel_log::crash_title;

/// Counts this thread's allocations, to check that lines before a report
/// cost none.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every allocation and deallocation is the system allocator's own; counting adds no
// allocation (a const-initialised thread-local Cell).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `alloc`'s contract, which is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, so from `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const DEV_SET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/testdata/kernel-crashes/syzkaller-dev.jsonl"
);

struct Case {
    id: String,
    title: String,
    alt: Vec<String>,
    panicked: bool,
    log: String,
}

fn load() -> Vec<Case> {
    let text = std::fs::read_to_string(DEV_SET).expect("read the development set");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json record");
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            Case {
                id: match &v["id"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                title: s("title"),
                alt: v["alt"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                panicked: v["panicked"].as_bool().unwrap_or(false),
                log: s("log"),
            }
        })
        .collect()
}

/// Digit runs become `NUM`.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push_str("NUM");
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

/// (kind part, culprit part) of a title.
fn split(title: &str) -> (&str, Option<&str>) {
    match title.rsplit_once(" in ") {
        Some((kind, culprit)) => (kind, Some(culprit)),
        None => (title, None),
    }
}

fn percent(n: usize, d: usize) -> f64 {
    if d == 0 {
        100.0
    } else {
        100.0 * n as f64 / d as f64
    }
}

#[test]
fn dev_set_titles() {
    let cases = load();
    assert!(cases.len() > 300, "only {} logs", cases.len());
    let (mut panicking, mut detected) = (0, 0);
    let (mut titled, mut kind_ok, mut titled_panicking, mut kind_ok_panicking) = (0, 0, 0, 0);
    let (mut with_culprit, mut culprit_ok, mut exact_ok) = (0, 0, 0);
    let (mut quiet, mut false_titles) = (0, 0);
    let mut mismatches = Vec::new();

    for case in &cases {
        let got = crash_title(case.log.split('\n'));
        if std::env::var("CRASH_TITLE_ID").is_ok_and(|id| id == case.id) {
            println!("{}: {got:#?}", case.id);
        }
        let got_title = got.as_ref().map(|t| normalise(&t.report_title));
        if case.panicked {
            panicking += 1;
            if got.is_some() {
                detected += 1;
            } else {
                mismatches.push(format!(
                    "{}: undetected panic, want {:?}",
                    case.id, case.title
                ));
            }
        }
        if case.title.is_empty() {
            quiet += 1;
            if let Some(t) = &got_title {
                false_titles += 1;
                mismatches.push(format!("{}: false title {t:?} on a quiet log", case.id));
            }
            continue;
        }
        let wanted: Vec<String> = std::iter::once(&case.title)
            .chain(&case.alt)
            .map(|t| normalise(t))
            .collect();
        let got_title = got_title.unwrap_or_default();
        let (got_kind, got_culprit) = split(&got_title);

        titled += 1;
        let kind_match = wanted.iter().any(|w| split(w).0 == got_kind);
        kind_ok += usize::from(kind_match);
        if case.panicked {
            titled_panicking += 1;
            kind_ok_panicking += usize::from(kind_match);
        }
        let exact = wanted.contains(&got_title);
        exact_ok += usize::from(exact);

        let want_culprit = split(&wanted[0]).1.filter(|c| *c != "corrupted");
        let mut culprit_match = true;
        if want_culprit.is_some() {
            with_culprit += 1;
            culprit_match =
                got_culprit.is_some_and(|g| wanted.iter().any(|w| split(w).1 == Some(g)));
            culprit_ok += usize::from(culprit_match);
        }
        if !kind_match || !culprit_match {
            mismatches.push(format!(
                "{}: want {:?} got {:?}{}{}",
                case.id,
                case.title,
                got_title,
                if kind_match { "" } else { " [kind]" },
                if culprit_match { "" } else { " [culprit]" },
            ));
        }
    }

    println!(
        "crash titles on the syzkaller development set ({} logs)",
        cases.len()
    );
    println!("| measure | count | % |");
    println!("|---|---|---|");
    println!(
        "| panicking logs detected | {detected}/{panicking} | {:.1} |",
        percent(detected, panicking)
    );
    println!(
        "| kind matches (titled logs) | {kind_ok}/{titled} | {:.1} |",
        percent(kind_ok, titled)
    );
    println!(
        "| kind matches (panicking logs) | {kind_ok_panicking}/{titled_panicking} | {:.1} |",
        percent(kind_ok_panicking, titled_panicking)
    );
    println!(
        "| culprit matches (titles naming a function) | {culprit_ok}/{with_culprit} | {:.1} |",
        percent(culprit_ok, with_culprit)
    );
    println!(
        "| exact title | {exact_ok}/{titled} | {:.1} |",
        percent(exact_ok, titled)
    );
    println!("| false titles on quiet logs | {false_titles}/{quiet} | |");
    println!("mismatches:");
    for m in &mismatches {
        println!("  {m}");
    }

    assert_eq!(detected, panicking, "every panicking log gets a title");
    assert!(percent(kind_ok, titled) >= 95.0, "kind {kind_ok}/{titled}");
    assert!(
        percent(culprit_ok, with_culprit) >= 85.0,
        "culprit {culprit_ok}/{with_culprit}"
    );
    assert_eq!(false_titles, 0, "no title on a quiet log");
}

#[test]
fn lines_before_a_report_allocate_nothing() {
    let quiet: Vec<String> = (0..10_000)
        .map(|i| match i % 4 {
            0 => format!("[{i:>5}.000001] eth0: link up, 1000Mbps, full-duplex"),
            1 => format!("[{i:>5}.000002][ T{i}] audit: type=1400 WARNING: not a report"),
            2 => format!("<6>[{i:>5}.000003] INFO: NMI handler took too long to run"),
            _ => format!("[{i:>5}.000004]  some_function+0x1{i}/0x200"),
        })
        .collect();
    let report = [
        "[ 99999.1] general protection fault: 0000 [#1] SMP",
        "[ 99999.1] RIP: 0010:tcp_v4_rcv+0x5d1/0xd60",
        "[ 99999.1] Kernel panic - not syncing: Fatal exception in interrupt",
    ];
    let quiet_only = allocations(|| {
        assert!(crash_title(quiet.iter().map(String::as_str)).is_none());
    });
    assert_eq!(quiet_only, 0, "allocations on quiet lines");
    let short = allocations(|| {
        let lines = quiet[..10].iter().map(String::as_str).chain(report);
        assert!(crash_title(lines).is_some());
    });
    let long = allocations(|| {
        let lines = quiet.iter().map(String::as_str).chain(report);
        assert!(crash_title(lines).is_some());
    });
    assert!(short > 0, "the counter counts");
    assert_eq!(
        short, long,
        "allocations grow with the lines before the report"
    );
}
