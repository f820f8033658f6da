//! The code's shape, as issue 14 set it (README "Where things are"): no function over
//! 80 lines and no file over 600 lines before its tests, and no two top-level modules
//! of `src/` that import each other, directly or through others. A change that breaks
//! one fails here with the place to look, instead of in the next review.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 80;
const MAX_FILE_LINES: usize = 600;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    assert!(files.len() > 20, "src/ not found at {}", root.display());
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            let before_tests = text.split("#[cfg(test)]").next().unwrap().to_string();
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            (rel, before_tests)
        })
        .collect()
}

/// The line without its `//` comment and with string literals emptied, so braces in
/// either do not count.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (false, '/') if chars.peek() == Some(&'/') => break,
            (false, '"') => in_str = true,
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => in_str = false,
            (true, _) => {}
            (false, '\'') if chars.clone().nth(1) == Some('\'') => {
                // A char literal such as '{': skip it.
                chars.next();
                chars.next();
            }
            (false, c) => out.push(c),
        }
    }
    out
}

fn fn_name(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let t = t.strip_prefix("const ").unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    let t = t.strip_prefix("unsafe ").unwrap_or(t);
    let rest = t.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&rest[..end])
}

/// (name, first line, length) of every function longer than the limit.
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(name) = fn_name(lines[i]) else {
            i += 1;
            continue;
        };
        let (mut depth, mut started, mut j) = (0i64, false, i);
        while j < lines.len() {
            let code = code_of(lines[j]);
            depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
            started |= code.contains('{');
            if (started && depth <= 0) || (!started && code.trim_end().ends_with(';')) {
                break;
            }
            j += 1;
        }
        if j - i + 1 > MAX_FN_LINES {
            long.push((name.to_string(), i + 1, j - i + 1));
        }
        i = j + 1;
    }
    long
}

#[test]
fn functions_and_files_stay_short() {
    let mut problems = Vec::new();
    for (file, text) in src_files() {
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            problems.push(format!("src/{file}: {n} lines before its tests"));
        }
        for (name, line, len) in long_functions(&text) {
            problems.push(format!("src/{file}:{line} fn {name}: {len} lines"));
        }
    }
    assert!(
        problems.is_empty(),
        "split these (functions <= {MAX_FN_LINES} lines, files <= {MAX_FILE_LINES} before tests):\n{}",
        problems.join("\n")
    );
}

/// Which top-level modules each top-level module names through `crate::`.
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in src_files() {
        let top = file.split('/').next().unwrap().trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let code: String = text.lines().map(|l| code_of(l) + "\n").collect();
        let deps = imports.entry(top.to_string()).or_default();
        for part in code.split("crate::").skip(1) {
            let names: Vec<&str> = match part.strip_prefix('{') {
                Some(group) => group.split('}').next().unwrap().split(',').collect(),
                None => vec![part],
            };
            for n in names {
                let n = n.trim();
                let end = n
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(n.len());
                if end > 0 && &n[..end] != top {
                    deps.insert(n[..end].to_string());
                }
            }
        }
    }
    imports
}

/// A path of imports from `from` back to `to`, if there is one.
fn path_back(
    g: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    to: &str,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if from == to {
        return Some(vec![to.to_string()]);
    }
    if !seen.insert(from.to_string()) {
        return None;
    }
    for next in g.get(from).into_iter().flatten() {
        if let Some(mut p) = path_back(g, next, to, seen) {
            p.insert(0, from.to_string());
            return Some(p);
        }
    }
    None
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = module_imports();
    assert!(g.contains_key("keystore") && g["keystore"].contains("error"));
    assert_eq!(
        g["error"].iter().collect::<Vec<_>>(),
        ["model"],
        "error.rs depends only on model"
    );
    for (m, deps) in &g {
        for d in deps {
            if let Some(back) = path_back(&g, d, m, &mut BTreeSet::new()) {
                panic!("import cycle: {m} -> {}", back.join(" -> "));
            }
        }
    }
}

/// The checks themselves find what they are for.
#[test]
fn the_shape_checks_can_fail() {
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let text = format!("pub fn big() {{\n{body}}}\nfn small() {{ \"{{\"; }}\n");
    assert_eq!(
        long_functions(&text),
        [("big".to_string(), 1, MAX_FN_LINES + 2)]
    );
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        path_back(&g, "b", "a", &mut BTreeSet::new()),
        Some(vec!["b".to_string(), "a".to_string()])
    );
}
