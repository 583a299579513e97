use super::*;

fn entry(time_ms: u64, action: &str) -> Entry {
    let mut entry = Entry::now(Kind::Nic, action);
    entry.time_ms = time_ms;
    entry.mac = Some("52:54:00:12:34:56".to_owned());
    entry
}

#[test]
fn entries_read_back_oldest_first_and_since_filters() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut trail = Trail::new(dir.path());
    for (t, action) in [(1_000, "removal"), (2_000, "registration"), (3_000, "removal")] {
        trail.record(&entry(t, action));
    }
    let all = read(dir.path(), None)?;
    let actions: Vec<&str> = all.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["removal", "registration", "removal"]);
    assert_eq!(read(dir.path(), Some(2_000))?.entries.len(), 2);
    assert_eq!(all.unreadable_lines, 0);
    Ok(())
}

#[test]
fn the_trail_rotates_and_keeps_a_bounded_number_of_files() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut trail = Trail::new(dir.path());
    let mut big = entry(0, "registration");
    big.decision = Some("x".repeat(100_000));
    let per_file = usize::try_from(MAX_FILE_BYTES / 100_000)?;
    let written = per_file * (KEPT_FILES + 2);
    for t in 0..written {
        big.time_ms = u64::try_from(t)?;
        trail.record(&big);
    }
    let files = std::fs::read_dir(dir.path())?.count();
    assert_eq!(files, KEPT_FILES, "current file plus rotated ones");
    for entry in std::fs::read_dir(dir.path())? {
        assert!(entry?.metadata()?.len() <= MAX_FILE_BYTES);
    }
    let history = read(dir.path(), None)?;
    // The newest entries survive, in order, the oldest fell off.
    let times: Vec<u64> = history.entries.iter().map(|e| e.time_ms).collect();
    assert_eq!(times.last().copied(), Some(u64::try_from(written - 1)?));
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    assert!(times.first().copied().unwrap_or(0) > 0);
    Ok(())
}

#[test]
fn a_torn_or_hostile_line_is_counted_and_escaped() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut forged = entry(5, "removal");
    forged.interface = Some("eth0\u{1b}[31m".to_owned());
    let text = format!("{}\n{{\"time_ms\":7,\"kin", serde_json::to_string(&forged)?);
    std::fs::write(dir.path().join(FILE_NAME), text)?;
    let history = read(dir.path(), None)?;
    assert_eq!(history.unreadable_lines, 1);
    assert_eq!(history.entries[0].interface.as_deref(), Some("eth0\\x1b[31m"));
    Ok(())
}

#[test]
fn a_missing_trail_is_empty_and_an_unwritable_one_does_not_panic() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    assert!(read(&dir.path().join("nowhere"), None)?.entries.is_empty());
    let mut trail = Trail::new(&dir.path().join("nowhere"));
    trail.record(&entry(1, "removal"));
    assert!(trail.failing);
    Ok(())
}

#[test]
fn since_takes_durations_and_times() -> Result<(), String> {
    let now = UNIX_EPOCH + Duration::from_secs(10_000);
    assert_eq!(parse_since("10m", now)?, 9_400_000);
    assert_eq!(parse_since("1970-01-01T00:00:05Z", now)?, 5_000);
    assert!(parse_since("yesterday-ish", now).is_err());
    Ok(())
}

#[test]
fn summary_names_who_and_what() {
    let mut e = entry(0, "removal");
    e.interface = Some("ens5".to_owned());
    e.cause = Some("driver-unload".to_owned());
    e.task = Some(Actor {
        pid: 9,
        uid: Some(0),
        comm: "modprobe".into(),
        ppid: None,
        parent_comm: None,
        cmdline: None,
    });
    e.decision = Some("hold the snapshot".to_owned());
    assert_eq!(
        e.summary(),
        "nic removal ens5 52:54:00:12:34:56 cause driver-unload by modprobe[9] uid 0: hold the snapshot"
    );
}

#[test]
fn an_entry_after_a_torn_line_starts_a_line_of_its_own() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(FILE_NAME), "{\"time_ms\":7,\"kin")?;
    let mut trail = Trail::new(dir.path());
    trail.record(&entry(9, "registration"));
    let history = read(dir.path(), None)?;
    assert_eq!(history.unreadable_lines, 1);
    assert_eq!(history.entries.len(), 1);
    assert_eq!(history.entries[0].action, "registration");
    Ok(())
}

#[test]
fn the_trail_is_never_written_through_a_symlink() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "")?;
    std::os::unix::fs::symlink(&target, dir.path().join(FILE_NAME))?;
    let mut trail = Trail::new(dir.path());
    trail.record(&entry(1, "removal"));
    assert!(trail.failing);
    assert_eq!(std::fs::read_to_string(&target)?, "");
    Ok(())
}

#[tokio::test]
async fn the_sink_writes_in_order_and_flushes_at_stop() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut sink = Sink::start(dir.path());
    let task =
        crate::classify::Task { pid: 999_999, tid: 999_999, comm: "gone".into(), uid: Some(0), ppid: None };
    for (t, action) in [(1_000, "removal"), (2_000, "registration"), (3_000, "restored")] {
        // A task that no longer exists: only the kernel's part.
        sink.record_by(entry(t, action), Some(&task), 0);
    }
    sink.flush().await;
    let actions: Vec<String> = read(dir.path(), None)?.entries.into_iter().map(|e| e.action).collect();
    assert_eq!(actions, ["removal", "registration", "restored"]);
    Ok(())
}
