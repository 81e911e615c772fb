//! Replays every fuzz corpus file (`fuzz/corpus/<target>/`) and every
//! crasher kept as a regression (`tests/regression/<target>/`) through the
//! same target code the fuzzers run (`vdisk::testing::fuzzing`), on stable Rust and
//! without cargo-fuzz.
//!
//! Every regression file must have a line in `tests/regression/MANIFEST`
//! (`<target>/<file>: what input, what went wrong, what the fix was`), and
//! every line there must name an existing file.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dir/<target>/`, by target.
fn files(dir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    let Ok(targets) = std::fs::read_dir(dir) else {
        return out;
    };
    for t in targets {
        let t = t.unwrap().path();
        if !t.is_dir() {
            continue;
        }
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        v.sort();
        out.insert(name, v);
    }
    out
}

/// Runs every file; returns the failures as "path: panic message".
fn replay(dir: &Path) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut failures = Vec::new();
    for (target, paths) in files(dir) {
        assert!(
            vdisk::testing::fuzzing::TARGETS.contains(&target.as_str()),
            "{}: no fuzz target called '{target}'",
            dir.display()
        );
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            n += 1;
            let r = catch_unwind(AssertUnwindSafe(|| vdisk::testing::fuzzing::run(&target, &data)));
            if let Err(e) = r {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", p.display()));
            }
        }
    }
    (n, failures)
}

#[test]
fn corpus_replays_without_panics() {
    let (n, failures) = replay(&root().join("fuzz/corpus"));
    assert!(n > 0, "no corpus files found under fuzz/corpus");
    for t in vdisk::testing::fuzzing::TARGETS {
        assert!(root().join("fuzz/corpus").join(t).is_dir(), "target {t} has no seed corpus");
    }
    assert!(failures.is_empty(), "{} of {n} corpus files fail:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn regressions_replay_without_panics() {
    let (_, failures) = replay(&root().join("tests/regression"));
    assert!(failures.is_empty(), "regression files fail again:\n{}", failures.join("\n"));
}

#[test]
fn every_regression_tells_its_story() {
    let dir = root().join("tests/regression");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST")).unwrap_or_default();
    let mut stories = BTreeMap::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (file, story) =
            line.split_once(": ").unwrap_or_else(|| panic!("MANIFEST line without 'file: story': {line}"));
        assert!(story.len() > 40, "MANIFEST story for {file} is too short to tell what happened");
        assert!(dir.join(file).is_file(), "MANIFEST names {file}, which does not exist");
        stories.insert(file.to_string(), story.to_string());
    }
    for (target, paths) in files(&dir) {
        for p in paths {
            let key = format!("{target}/{}", p.file_name().unwrap().to_string_lossy());
            assert!(stories.contains_key(&key), "regression file {key} has no line in tests/regression/MANIFEST");
        }
    }
}
