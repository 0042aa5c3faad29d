//! The house rules, checked (issue 13): the source tree stays a map a
//! newcomer can read.
//!
//! * no source file in `src/` or `engines/` over 600 lines, and no function
//!   over 100;
//! * `src/` names a concrete engine crate in exactly one file
//!   (`src/engines.rs`, where engines are registered);
//! * no import cycle among the modules of `src/` (file by file);
//! * ARCHITECTURE.md and the README's layout table name every folder and
//!   top-level file of `src/`, and nothing that does not exist.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 100;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn source_files() -> Vec<PathBuf> {
    let mut files = rust_files(&root().join("src"));
    files.extend(rust_files(&root().join("engines")));
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap().display().to_string()
}

#[test]
fn no_source_file_is_over_600_lines() {
    let long: Vec<String> = source_files()
        .iter()
        .filter_map(|path| {
            let lines = std::fs::read_to_string(path).unwrap().lines().count();
            (lines > MAX_FILE_LINES).then(|| format!("{} ({lines} lines)", relative(path)))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:#?}");
}

/// Each function's first line (its `fn` line) and length in lines, as
/// rustfmt lays code out: the body ends at the first `}` back at the
/// indentation of the `fn` line.
fn functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let is_fn = ["fn ", "pub fn ", "async fn ", "pub async fn ", "const fn "]
            .iter()
            .any(|p| trimmed.starts_with(p))
            || (trimmed.starts_with("pub(") && trimmed.contains(" fn "));
        if !is_fn || trimmed.ends_with(';') {
            continue;
        }
        let Some(body) = (start..lines.len()).find(|&i| {
            let l = lines[i].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[body].trim_end().ends_with(';') {
            continue; // a declaration without a body
        }
        let closing = format!("{indent}}}");
        if let Some(end) = (body..lines.len()).find(|&i| lines[i].trim_end() == closing) {
            found.push((start + 1, trimmed.to_owned(), end - start + 1));
        }
    }
    found
}

#[test]
fn no_function_is_over_100_lines() {
    let mut long = Vec::new();
    for path in source_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, signature, length) in functions(&text) {
            if length >= MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}:{line} {signature} ({length} lines)",
                    relative(&path)
                ));
            }
        }
    }
    assert!(long.is_empty(), "split these functions: {long:#?}");
}

#[test]
fn src_names_a_concrete_engine_in_one_place() {
    let naming: Vec<String> = rust_files(&root().join("src"))
        .iter()
        .filter(|path| {
            std::fs::read_to_string(path)
                .unwrap()
                .contains("ephemera_engine_postgres")
        })
        .map(|path| relative(path))
        .collect();
    assert_eq!(naming, vec!["src/engines.rs".to_owned()]);
}

/// The module path of a file under `src/` (`session::front_door`;
/// `session` for `session/mod.rs`; the crate root is empty).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(root().join("src")).unwrap();
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Expand `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut items = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[from..]);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .flat_map(|item| {
            expand(item)
                .into_iter()
                .map(move |p| format!("{prefix}{p}"))
        })
        .collect()
}

/// Every path a file refers to, made absolute (`crate::…` without the
/// `crate::`): its `use` trees and inline `crate::` paths.
fn references(text: &str, module: &str, is_mod_file: bool) -> Vec<String> {
    let parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let own: String = module.to_owned();
    let up = if is_mod_file || module.is_empty() {
        parent[..parent.len().saturating_sub(1)].join("::")
    } else {
        parent[..parent.len() - 1].join("::")
    };
    let join = |base: &str, rest: &str| {
        if base.is_empty() {
            rest.to_owned()
        } else {
            format!("{base}::{rest}")
        }
    };
    let mut paths = Vec::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in code.split(';') {
        let Some(at) = statement.find("use ") else {
            continue;
        };
        for path in expand(&statement[at + 4..]) {
            if let Some(rest) = path.strip_prefix("crate::") {
                paths.push(rest.to_owned());
            } else if let Some(rest) = path.strip_prefix("super::") {
                paths.push(join(&up, rest));
            } else if let Some(rest) = path.strip_prefix("self::") {
                paths.push(join(&own, rest));
            }
        }
    }
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + 7..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches(':').to_owned());
    }
    paths
}

/// The module graph of `src/`: each file's module → the modules it uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(&root().join("src"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        if file.ends_with("main.rs") || file.starts_with(root().join("src/cli")) {
            continue; // the binary's modules: a crate of their own
        }
        let module = module_of(file);
        let is_mod_file = file.ends_with("mod.rs");
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests (`#[cfg(test)] mod tests`, at the end of a file by
        // convention) look at their own module through `super`.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut uses = BTreeSet::new();
        for path in references(text, &module, is_mod_file) {
            let segments: Vec<&str> = path.split("::").collect();
            let target = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|candidate| modules.contains(candidate));
            if let Some(target) = target {
                if target != module && !target.is_empty() {
                    uses.insert(target);
                }
            }
        }
        graph.insert(module, uses);
    }
    graph
}

#[test]
fn no_import_cycle_among_src_modules() {
    let graph = module_graph();
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            cycles.push(format!("{} -> {node}", path[at..].join(" -> ")));
            return;
        }
        if !done.insert(node.to_owned()) {
            return;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

/// What a document names in backticks that looks like a path under `src/`.
fn src_paths_named(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("src/"))
        .map(|s| s.trim_end_matches(',').to_owned())
        .collect()
}

/// Every folder (`src/x/`) and file (`src/x.rs`) directly under `src/`.
fn src_entries() -> BTreeSet<String> {
    std::fs::read_dir(root().join("src"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                format!("src/{name}/")
            } else {
                format!("src/{name}")
            }
        })
        .collect()
}

fn check_document_matches_tree(text: &str, document: &str) {
    let named = src_paths_named(text);
    let missing: Vec<String> = src_entries()
        .into_iter()
        .filter(|e| !named.contains(e))
        .collect();
    assert!(
        missing.is_empty(),
        "{document} does not mention {missing:?}"
    );
    let gone: Vec<&String> = named
        .iter()
        .filter(|p| !root().join(p.trim_end_matches('/')).exists())
        .collect();
    assert!(
        gone.is_empty(),
        "{document} names what does not exist: {gone:?}"
    );
}

#[test]
fn architecture_md_matches_the_tree() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    check_document_matches_tree(&text, "ARCHITECTURE.md");
    // Each file ARCHITECTURE.md names inside a folder (`relay.rs` in the
    // row of `src/session/`) exists there.
    for line in text.lines().filter(|l| l.starts_with("| `src/")) {
        let folder = line.split('`').nth(1).unwrap();
        if !folder.ends_with('/') {
            continue;
        }
        for name in line.split('`').skip(3).step_by(2) {
            let is_file = name.ends_with(".rs") || name.ends_with('/');
            if is_file && !name.starts_with("src/") && !name.contains(' ') {
                let path = root().join(folder).join(name.trim_end_matches('/'));
                assert!(
                    path.exists(),
                    "ARCHITECTURE.md: {folder}{name} does not exist"
                );
            }
        }
    }
}

#[test]
fn the_readme_layout_table_matches_the_tree() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let layout = text
        .split("## Layout")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a Layout section");
    check_document_matches_tree(layout, "README.md's layout table");
}
