//! The components of `src/` use each other only as docs/architecture.md's table allows, so
//! they cannot close into cycles again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `component → what it may use`, from the table under "Who may use whom"; `None` means
/// anything.
fn allowed() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let page = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let table = page
        .split("## Who may use whom")
        .nth(1)
        .expect("docs/architecture.md has a section \"Who may use whom\"");
    let mut allowed = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let component = cells[1].trim_matches('`').to_owned();
        let uses = match cells[2] {
            "anything" => None,
            cell => Some(backticked(cell)),
        };
        allowed.insert(component, uses);
    }
    allowed
}

fn backticked(cell: &str) -> BTreeSet<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every component (a folder or a file directly under `src/`, `lib.rs` and `main.rs` aside)
/// with the source files that make it, unit-test files left out.
fn components() -> BTreeMap<String, Vec<PathBuf>> {
    let src = root().join("src");
    let mut components = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "lib.rs" || name == "main.rs" {
            continue;
        }
        let component = name.trim_end_matches(".rs").to_owned();
        let mut files = Vec::new();
        collect(&path, &mut files);
        files.retain(|f| !is_test_file(f));
        components.insert(component, files);
    }
    components
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            collect(&entry.unwrap().path(), files);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        files.push(path.to_owned());
    }
}

fn is_test_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
}

/// The components a source names through `crate::…` (`crate::a::b`, `crate::{a, b}`), its
/// inline unit tests left out.
fn used(text: &str) -> BTreeSet<String> {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut used = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            used.extend(group.split(',').filter_map(|item| first_ident(item.trim())));
        } else {
            used.extend(first_ident(rest));
        }
    }
    used
}

fn first_ident(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| text[..end].to_owned())
}

/// Every `crate::` use that the table does not allow: `(component, used, file)`.
fn violations(
    components: &BTreeMap<String, Vec<PathBuf>>,
    allowed: &BTreeMap<String, Option<BTreeSet<String>>>,
) -> Vec<(String, String, PathBuf)> {
    let mut wrong = Vec::new();
    for (component, files) in components {
        let may = allowed
            .get(component)
            .cloned()
            .unwrap_or(Some(BTreeSet::new()));
        let Some(may) = may else { continue };
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for other in used(&text) {
                if &other != component && components.contains_key(&other) && !may.contains(&other) {
                    wrong.push((component.clone(), other, file.clone()));
                }
            }
        }
    }
    wrong
}

#[test]
fn components_use_only_what_the_architecture_page_allows() {
    let components = components();
    let allowed = allowed();
    for component in components.keys() {
        assert!(
            allowed.contains_key(component),
            "{component} is not in docs/architecture.md's table: say what it may use"
        );
    }
    let wrong = violations(&components, &allowed);
    assert!(
        wrong.is_empty(),
        "imports docs/architecture.md does not allow:\n{}",
        wrong
            .iter()
            .map(|(c, u, f)| {
                let f = f.strip_prefix(root()).unwrap_or(f);
                format!("  {c} uses {u} in {}", f.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_check_sees_paths_and_groups_and_skips_unit_tests() {
    let text = "use crate::broker::Publisher;\nuse crate::{fleet, ops::metrics};\n\
                fn f() { crate::json::parse(); }\n#[cfg(test)]\nmod tests {\n use crate::tools;\n}";
    let names: Vec<String> = used(text).into_iter().collect();
    assert_eq!(names, ["broker", "fleet", "json", "ops"]);
    // A use the table forbids is reported.
    let dir = std::env::temp_dir().join(format!("arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("up.rs");
    std::fs::write(&file, "use crate::pipeline::Pipeline;").unwrap();
    let components = BTreeMap::from([
        ("contract".to_owned(), vec![file.clone()]),
        ("pipeline".to_owned(), vec![]),
    ]);
    let allowed = BTreeMap::from([("contract".to_owned(), Some(BTreeSet::new()))]);
    let wrong = violations(&components, &allowed);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(wrong, [("contract".into(), "pipeline".into(), file)]);
}
