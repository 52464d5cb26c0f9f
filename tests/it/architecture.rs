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
        // `app.rs` and `app/` make one component.
        components
            .entry(component)
            .or_insert_with(Vec::new)
            .extend(files);
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

/// The module path of a source file: `src/pipeline/lanes/task.rs` is `pipeline::lanes::task`,
/// `src/fleet/mod.rs` is `fleet`.
fn module_of(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(root().join("src")).unwrap_or(file);
    let mut module: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    module
}

/// The components a source file names by a path from the crate's root (`crate::…`, or enough
/// `super::` to reach it), in `use` trees (groups nested at any depth) and in paths anywhere in
/// its code; items under `#[cfg(test)]` left out. A real parser (`syn`), so nothing after a
/// `mod tests;` line, in a nested group or behind `super::super::` escapes it. Paths inside
/// macro invocations are not parsed; the crate uses `crate::` paths there nowhere.
fn used(text: &str, module: &[String]) -> BTreeSet<String> {
    uses_in(text, module).found
}

fn uses_in(text: &str, module: &[String]) -> Uses {
    let file = syn::parse_file(text).expect("every source file parses");
    let mut uses = Uses {
        module: module.to_vec(),
        found: BTreeSet::new(),
        roots: BTreeSet::new(),
    };
    syn::visit::Visit::visit_file(&mut uses, &file);
    uses
}

/// The first segments of every other path a file spells out: the external crates it names
/// (among local names, which no crate shares).
fn roots(text: &str, module: &[String]) -> BTreeSet<String> {
    uses_in(text, module).roots
}

struct Uses {
    /// The module being visited: the file's, and inline modules within it.
    module: Vec<String>,
    found: BTreeSet<String>,
    /// The first segment of every path not from the crate's root.
    roots: BTreeSet<String>,
}

impl Uses {
    /// Records the component a path names, if it names one from the crate's root.
    fn resolve(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute: Vec<&String> = match first.as_str() {
            "crate" => segments[1..].iter().collect(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let Some(base) = self.module.len().checked_sub(ups) else {
                    return;
                };
                self.module[..base].iter().chain(&segments[ups..]).collect()
            }
            "self" => self.module.iter().chain(&segments[1..]).collect(),
            other => {
                self.roots.insert(other.to_owned());
                return;
            }
        };
        if let Some(component) = absolute.first() {
            self.found.insert((*component).clone());
        }
    }

    /// Every path a `use` tree spells out, from its root to each leaf.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.leaf(prefix, &n.ident),
            syn::UseTree::Rename(r) => self.leaf(prefix, &r.ident),
            syn::UseTree::Glob(_) => self.resolve(prefix),
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }

    fn leaf(&mut self, prefix: &mut Vec<String>, ident: &syn::Ident) {
        prefix.push(ident.to_string());
        self.resolve(prefix);
        prefix.pop();
    }
}

/// Whether the attributes put an item under `#[cfg(test)]`.
fn test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

impl<'ast> syn::visit::Visit<'ast> for Uses {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => &Vec::new(),
        };
        if !test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if item.content.is_some() {
            self.module.push(item.ident.to_string());
            syn::visit::visit_item_mod(self, item);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, path);
    }
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
            for other in used(&text, &module_of(file)) {
                if &other != component && components.contains_key(&other) && !may.contains(&other) {
                    wrong.push((component.clone(), other, file.clone()));
                }
            }
        }
    }
    wrong
}

/// Every allowance of the table that no file of its component uses: `(component, allowed)`.
fn unused_allowances(
    components: &BTreeMap<String, Vec<PathBuf>>,
    allowed: &BTreeMap<String, Option<BTreeSet<String>>>,
) -> Vec<(String, String)> {
    let mut stale = Vec::new();
    for (component, may) in allowed {
        let (Some(may), Some(files)) = (may, components.get(component)) else {
            continue;
        };
        let mut uses = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            uses.extend(used(&text, &module_of(file)));
        }
        stale.extend(
            may.iter()
                .filter(|m| !uses.contains(*m))
                .map(|m| (component.clone(), m.clone())),
        );
    }
    stale
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
    let stale = unused_allowances(&components, &allowed);
    assert!(
        stale.is_empty(),
        "docs/architecture.md allows what nothing uses (remove the row's entry): {stale:?}"
    );
}

#[test]
fn the_check_sees_paths_groups_and_supers_and_skips_unit_tests() {
    let text = "use crate::broker::Publisher;\n\
                use crate::{ops::{metrics, telemetry}, fleet::{holds::{Holds}, Fleet}};\n\
                #[cfg(test)]\nmod tests;\n\
                fn f() { crate::json::parse(); let _ = super::super::super::shutdown::Shutdown::new(); }\n\
                fn g() -> super::Local { todo!() }\n\
                #[cfg(test)]\nmod more {\n use crate::tools;\n}";
    let module = ["pipeline".to_owned(), "lanes".to_owned(), "task".to_owned()];
    let names: Vec<String> = used(text, &module).into_iter().collect();
    assert_eq!(
        names,
        ["broker", "fleet", "json", "ops", "pipeline", "shutdown"]
    );
    assert_eq!(
        module_of(&root().join("src/fleet/mod.rs")),
        ["fleet".to_owned()]
    );
    // A use the table forbids is reported, and an allowance nothing uses.
    let dir = std::env::temp_dir().join(format!("arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("up.rs");
    std::fs::write(&file, "use crate::pipeline::Pipeline;").unwrap();
    let components = BTreeMap::from([
        ("contract".to_owned(), vec![file.clone()]),
        ("pipeline".to_owned(), vec![]),
    ]);
    let allowed = BTreeMap::from([
        ("contract".to_owned(), Some(BTreeSet::new())),
        (
            "pipeline".to_owned(),
            Some(BTreeSet::from(["json".to_owned()])),
        ),
    ]);
    let wrong = violations(&components, &allowed);
    let stale = unused_allowances(&components, &allowed);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(wrong, [("contract".into(), "pipeline".into(), file)]);
    assert_eq!(stale, [("pipeline".to_owned(), "json".to_owned())]);
}

/// Components that may name lapin: the broker, which owns AMQP; `config`, which reads an AMQP
/// URL to validate it; and the tools. docs/architecture.md says why.
const SPEAK_LAPIN: [&str; 3] = ["broker", "config", "tools"];

/// Every file outside [`SPEAK_LAPIN`] that names lapin.
fn lapin_outside_broker(components: &BTreeMap<String, Vec<PathBuf>>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for (component, files) in components {
        if SPEAK_LAPIN.contains(&component.as_str()) {
            continue;
        }
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            if roots(&text, &module_of(file)).contains("lapin") {
                found.push(file.strip_prefix(root()).unwrap_or(file).to_owned());
            }
        }
    }
    found
}

#[test]
fn only_the_broker_speaks_amqp() {
    let found = lapin_outside_broker(&components());
    assert!(
        found.is_empty(),
        "lapin named outside broker (use broker::Delivery and the broker's operations): {found:?}"
    );
    // The check sees a use, a path in code and a group, and not a test module.
    let module = ["pipeline".to_owned()];
    for text in [
        "use lapin::options::BasicAckOptions;",
        "fn f(c: &lapin::Channel) {}",
        "use {std::sync::Arc, lapin::Connection};",
    ] {
        assert!(roots(text, &module).contains("lapin"), "{text}");
    }
    let in_tests = "#[cfg(test)]\nmod tests { use lapin::Channel; }";
    assert!(!roots(in_tests, &module).contains("lapin"));
}
