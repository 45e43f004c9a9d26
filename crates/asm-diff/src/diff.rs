//! Normalisation and correlation of the blocks of two files, and the one-input filter.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::emit::{self, Plan};
use crate::model::{section_key, Def, Model, SecKind, KNOWN_DIRECTIVES};
use crate::parse::{tokenize, Kind, Stmt, TokKind};
use crate::{Diff, Error, Options};

/// Nesting limit when literals reference literals (pointer tables to strings).
const MAX_INLINE_DEPTH: u8 = 4;

/// Constants below this are never taken for `__LINE__` values.
const MIN_LINE_NUMBER: i64 = 10;

/// Turns blocks of one file into comparable text, independent of compiler numbering.
pub(crate) struct Norm<'m, 'a> {
    m: &'m Model<'a>,
    data_cache: RefCell<HashMap<usize, String>>,
}

impl<'m, 'a> Norm<'m, 'a> {
    pub(crate) fn new(m: &'m Model<'a>) -> Self {
        Norm {
            m,
            data_cache: RefCell::new(HashMap::new()),
        }
    }

    fn sym(&self, name: &str, locals: Option<&HashMap<&str, usize>>, depth: u8, out: &mut String) {
        if let Some(i) = locals.and_then(|l| l.get(name)) {
            out.push_str(&format!("#L{i}"));
            return;
        }
        match self.m.defs.get(name) {
            // Coverage records change with every edit; code referencing them
            // (gcov's constructor) is unchanged.
            Some(Def::Data(di)) if self.m.is_literal(*di) && !is_instrumentation(name) => {
                if depth >= MAX_INLINE_DEPTH {
                    out.push_str("{..}");
                } else {
                    out.push('{');
                    out.push_str(&self.data(*di, depth + 1));
                    out.push('}');
                }
            }
            _ => out.push_str(self.m.key(name)),
        }
    }

    /// Normalised text of one statement: prefix/mnemonic/directive, then tokens.
    pub(crate) fn stmt(
        &self,
        s: &Stmt,
        locals: Option<&HashMap<&str, usize>>,
        depth: u8,
    ) -> String {
        let args = s.args();
        let head_len = s.text.len() - args.len();
        let mut out = String::with_capacity(s.text.len());
        for w in s.text[..head_len].split_whitespace() {
            out.push_str(w);
            out.push(' ');
        }
        for t in tokenize(args) {
            let txt = &args[t.span.clone()];
            if t.kind == TokKind::Sym {
                self.sym(txt, locals, depth, &mut out);
            } else {
                out.push_str(txt);
            }
        }
        out
    }

    /// Normalised content of a data block (section, alignment, content).
    pub(crate) fn data(&self, di: usize, depth: u8) -> String {
        if let Some(s) = self.data_cache.borrow().get(&di) {
            return s.clone();
        }
        let d = &self.m.datas[di];
        let mut out = format!(
            "{}|{}|",
            section_key(&self.m.sections[d.section].name),
            self.m.data_align(d)
        );
        for i in d.label + 1..d.end {
            let s = self.m.stmt(i);
            if s.kind != Kind::Blank {
                out.push_str(&self.stmt(s, None, depth));
                out.push(';');
            }
        }
        self.data_cache.borrow_mut().insert(di, out.clone());
        out
    }

    /// Normalised statement stream of a function (cold part and jump tables included).
    pub(crate) fn func(&self, fi: usize) -> Vec<String> {
        let f = &self.m.funcs[fi];
        let (locals, referenced) = func_labels(self.m, fi);
        let mut out = Vec::with_capacity(f.end - f.start + 1);
        for i in f.start..=f.end {
            let s = self.m.stmt(i);
            match s.kind {
                Kind::Blank => {}
                Kind::Label => {
                    if i == f.start || f.parts.contains(&s.head) || referenced.contains(s.head) {
                        let mut t = String::new();
                        self.sym(s.head, Some(&locals), 0, &mut t);
                        t.push(':');
                        out.push(t);
                    }
                }
                Kind::Directive if is_debug_directive(s.head) => {}
                Kind::Directive if self.m.switch[i] => {
                    let sec = self.m.section(i);
                    out.push(format!(
                        "section {:?} {}",
                        sec.kind,
                        section_flavour(&sec.name)
                    ));
                }
                _ => out.push(self.stmt(s, Some(&locals), 0)),
            }
        }
        out
    }
}

/// `.loc`, `.loc_*` and `.file`: line-number information only.
pub(crate) fn is_debug_directive(head: &str) -> bool {
    head == ".file" || head == ".loc" || head.starts_with(".loc_")
}

/// The part of a text section name that decides placement (hot/cold/startup).
pub(crate) fn section_flavour(name: &str) -> &'static str {
    if name.contains("unlikely") || name.contains(".cold") {
        "cold"
    } else if name.contains("startup") {
        "startup"
    } else if name.contains("exit") {
        "exit"
    } else if name.contains(".hot") {
        "hot"
    } else {
        "plain"
    }
}

/// Labels defined inside a function (numbered in order) and the symbols its
/// code refers to.
pub(crate) fn func_labels<'a>(
    m: &Model<'a>,
    fi: usize,
) -> (HashMap<&'a str, usize>, HashSet<&'a str>) {
    let f = &m.funcs[fi];
    let mut locals = HashMap::new();
    let mut referenced = HashSet::new();
    for i in f.start..=f.end {
        let s = m.stmt(i);
        match s.kind {
            Kind::Label => {
                let n = locals.len();
                locals.entry(s.head).or_insert(n);
            }
            Kind::Directive if is_debug_directive(s.head) => {}
            Kind::Directive | Kind::Instruction => {
                let args = s.args();
                for t in tokenize(args) {
                    if t.kind == TokKind::Sym {
                        referenced.insert(&args[t.span]);
                    }
                }
            }
            Kind::Blank => {}
        }
    }
    (locals, referenced)
}

/// A named variable: a non-local data block or a `.comm` symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Var {
    /// Data block index.
    Data(usize),
    /// `.comm` index.
    Comm(usize),
}

/// Named variables of a file by canonical key.
fn variables<'a>(m: &'a Model<'a>) -> Vec<(&'a str, &'a str, Var)> {
    let mut v = Vec::new();
    for (i, d) in m.datas.iter().enumerate() {
        if !m.is_literal(i) && m.sections[d.section].kind != SecKind::InitArray {
            v.push((m.key(d.name), d.name, Var::Data(i)));
        }
    }
    for (i, c) in m.comms.iter().enumerate() {
        v.push((m.key(c.name), c.name, Var::Comm(i)));
    }
    v
}

/// Comparable shape of a variable: (section, alignment, size, content).
fn var_sig(m: &Model, n: &Norm, v: Var) -> [String; 4] {
    match v {
        Var::Comm(i) => [
            ".bss(comm)".into(),
            String::new(),
            m.comms[i].shape.clone(),
            String::new(),
        ],
        Var::Data(i) => {
            let d = &m.datas[i];
            let size = (d.start..d.label)
                .map(|k| m.stmt(k))
                .find(|s| s.head == ".size")
                .map(|s| s.args().split(',').nth(1).unwrap_or("").trim().to_string())
                .unwrap_or_default();
            let full = n.data(i, 0);
            let content = full.splitn(3, '|').nth(2).unwrap_or("").to_string();
            [
                section_key(&m.sections[d.section].name),
                m.data_align(d),
                size,
                content,
            ]
        }
    }
}

/// Compiler instrumentation data (gcov `--coverage`/`-fprofile-arcs`, `-fprofile-generate`):
/// records and counters, not program state.
pub(crate) fn is_instrumentation(name: &str) -> bool {
    name.starts_with("__gcov") || name.starts_with(".LPBX") || name.starts_with("__llvm_prf")
}

/// Counter arrays the instrumented code itself writes (`__gcov0.f`, `__gcov7.f`, ...).
fn is_counter(name: &str) -> bool {
    name.strip_prefix("__gcov")
        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

fn is_tls(m: &Model, v: Var) -> bool {
    match v {
        Var::Data(i) => m.sections[m.datas[i].section].kind == SecKind::Tls,
        Var::Comm(_) => false,
    }
}

/// Reports directives we do not model (kept verbatim anyway).
fn unknown_directives(m: &Model, which: &str, warnings: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for s in &m.p.stmts {
        if s.kind == Kind::Directive
            && !KNOWN_DIRECTIVES.contains(&s.head)
            && !crate::model::DATA_DIRECTIVES.contains(&s.head)
            && !s.head.starts_with(".cfi_")
        {
            seen.insert(s.head);
        }
    }
    for d in seen {
        warnings.push(format!("{which}: unknown directive `{d}` kept verbatim"));
    }
}

/// `--dbg-filter`: the same code without line-number and DWARF noise.
///
/// Drops `.loc*`, numbered `.file` entries and the `.debug_*` sections; keeps
/// everything else (including `.cfi_*`) verbatim, so the result assembles to the
/// same code, data, relocations and `.eh_frame`.
pub fn filter(input: &str, opts: &Options) -> Result<String, Error> {
    let m = Model::new(input);
    if opts.verbose {
        let mut w = Vec::new();
        unknown_directives(&m, "input", &mut w);
        for x in w {
            tracing::warn!("{x}");
        }
    }
    let mut drop_line = vec![false; m.p.lines.len()];
    let mut replace: HashMap<usize, String> = HashMap::new();
    let mut prev_debug = false;
    for (i, s) in m.p.stmts.iter().enumerate() {
        let in_debug = m.section(i).kind == SecKind::Debug;
        let drop = match s.kind {
            // `.loc` and `.loc_mark_labels`, but not `.local` (that binds a symbol).
            Kind::Directive if s.head == ".loc" || s.head.starts_with(".loc_") => true,
            Kind::Directive if s.head == ".file" => {
                s.args().starts_with(|c: char| c.is_ascii_digit())
            }
            // Section-independent directives (`.ident`, `.globl`) stay.
            Kind::Directive if in_debug => {
                m.switch[i]
                    || crate::model::DATA_DIRECTIVES.contains(&s.head)
                    || matches!(s.head, ".align" | ".p2align" | ".balign" | ".set" | ".equ")
            }
            _ => in_debug,
        };
        if drop {
            drop_line[s.line] = true;
        } else if prev_debug && m.switch[i] && matches!(s.head, ".previous" | ".popsection") {
            // The section it returns to was entered by a line we dropped; name it.
            replace.insert(s.line, format!("\t.section\t{}", m.section(i).name));
        }
        prev_debug = in_debug;
    }
    let mut out = String::with_capacity(input.len());
    for (ln, line) in m.p.lines.iter().enumerate() {
        if let Some(r) = replace.get(&ln) {
            out.push_str(r);
        } else if drop_line[ln] {
            continue;
        } else {
            out.push_str(line);
        }
        if ln + 1 < m.p.lines.len() {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Diffs two assembly files of one C file and emits the augmented assembly.
pub fn gensrc(original: &str, patched: &str, opts: &Options) -> Result<Diff, Error> {
    let o = Model::new(original);
    let p = Model::new(patched);
    let (no, np) = (Norm::new(&o), Norm::new(&p));
    let mut warnings = Vec::new();
    if opts.verbose {
        unknown_directives(&o, "original", &mut warnings);
        unknown_directives(&p, "patched", &mut warnings);
    }

    // Variables: existing ones must be untouched; new ones are emitted.
    let ovars: HashMap<&str, (&str, Var)> = variables(&o)
        .into_iter()
        .map(|(k, n, v)| (k, (n, v)))
        .collect();
    let mut var_map: HashMap<&str, String> = HashMap::new();
    let mut new_vars = Vec::new();
    for (key, name, pv) in variables(&p) {
        match ovars.get(key) {
            Some(&(oname, ov)) => {
                let (a, b) = (var_sig(&o, &no, ov), var_sig(&p, &np, pv));
                if a != b && is_instrumentation(oname) {
                    // Coverage/profile data changes with any edit of the file
                    // (checksums, counter counts). It is no program state: old
                    // records and counters stay; counters of a new shape are new
                    // zeroed data for the patched code, so it never writes past the
                    // old array.
                    if is_counter(oname) && a[..3] != b[..3] {
                        warnings.push(format!(
                            "instrumentation counters `{oname}` changed shape: the patched code counts in new data (its counts are not written to the coverage file)"
                        ));
                        var_map.insert(name, format!("{name}.kpatch"));
                        new_vars.push(pv);
                    } else {
                        warnings.push(format!(
                            "instrumentation data `{oname}` changed; the original is kept"
                        ));
                        var_map.insert(name, oname.to_string());
                    }
                    continue;
                }
                if a != b {
                    if is_tls(&o, ov) || is_tls(&p, pv) {
                        return Err(Error::TlsChanged {
                            name: oname.to_string(),
                            what: "changed",
                        });
                    }
                    let what = ["section", "alignment", "size", "initial value"]
                        [a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(3)];
                    return Err(Error::VariableChanged {
                        name: oname.to_string(),
                        what,
                    });
                }
                var_map.insert(name, oname.to_string());
            }
            None => {
                if is_tls(&p, pv) {
                    return Err(Error::TlsChanged {
                        name: name.to_string(),
                        what: "added",
                    });
                }
                let global = p.globals.contains(name);
                var_map.insert(
                    name,
                    if global {
                        name.to_string()
                    } else {
                        format!("{name}.kpatch")
                    },
                );
                new_vars.push(pv);
            }
        }
    }

    // Constructors and destructors.
    let init = |m: &Model, n: &Norm| -> Vec<(String, String)> {
        m.init_stmts
            .iter()
            .filter(|&&i| !m.switch[i] && m.stmt(i).kind != Kind::Label)
            .map(|&i| (m.section(i).name.clone(), n.stmt(m.stmt(i), None, 0)))
            .collect()
    };
    let (oi, pi) = (init(&o, &no), init(&p, &np));
    if oi != pi {
        let section = oi
            .iter()
            .zip(&pi)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a.0.clone())
            .or_else(|| oi.get(pi.len()).or(pi.get(oi.len())).map(|x| x.0.clone()))
            .unwrap_or_else(|| ".init_array".into());
        return Err(Error::InitArrayChanged { section });
    }

    // Functions.
    let ofuncs: HashMap<&str, usize> = o
        .funcs
        .iter()
        .enumerate()
        .map(|(i, f)| (o.key(f.name), i))
        .collect();
    let mut changed = Vec::new();
    let mut added = Vec::new();
    for (pfi, f) in p.funcs.iter().enumerate() {
        match ofuncs.get(p.key(f.name)) {
            Some(&ofi) => {
                let (a, b) = (no.func(ofi), np.func(pfi));
                if a == b {
                    continue;
                }
                let shift = match (first_loc_line(&o, ofi), first_loc_line(&p, pfi)) {
                    (Some(x), Some(y)) => Some(y - x),
                    _ => None,
                };
                if let Some(delta) =
                    line_macro_only(&a, &b).filter(|d| !matches!(shift, Some(s) if s != *d))
                {
                    warnings.push(format!(
                        "function `{}` differs only in integer constants shifted by {delta} (a __LINE__ change?){}",
                        o.funcs[ofi].name,
                        if opts.ignore_line_macros { "; ignored" } else { "; patched" }
                    ));
                    if opts.ignore_line_macros {
                        continue;
                    }
                }
                let size = emit::estimate_size(&o, ofi);
                if size < 5 {
                    return Err(Error::FunctionTooShort {
                        name: o.funcs[ofi].name.to_string(),
                        size,
                    });
                }
                changed.push((ofi, pfi));
            }
            None => added.push(pfi),
        }
    }

    let mut diff = Diff {
        changed: changed
            .iter()
            .map(|&(ofi, _)| o.funcs[ofi].name.to_string())
            .collect(),
        added: added
            .iter()
            .map(|&pfi| p.funcs[pfi].name.to_string())
            .collect(),
        ..Diff::default()
    };
    if diff.changed.iter().any(|n| n == "main") {
        // Usually an inlined callee changed. main never returns, so a live
        // patch replacing it can never pass the safety check.
        warnings.push(
            "function `main` changed (an inlined callee?): main stays on the stack of a running \
             process, so this patch cannot be applied safely; mark the callee noinline"
                .to_string(),
        );
    }
    // New variables only matter when code uses them.
    if changed.is_empty() && added.is_empty() {
        diff.asm = original.to_string();
        diff.warnings = warnings;
        return Ok(diff);
    }
    let plan = Plan {
        o: &o,
        p: &p,
        changed: &changed,
        added: &added,
        new_vars: &new_vars,
        var_map: &var_map,
    };
    diff.asm = emit::emit(&plan, opts, &mut warnings);
    diff.warnings = warnings;
    Ok(diff)
}

/// If two streams differ only in decimal integer tokens, all shifted by the same
/// non-zero amount, returns that amount: the signature of a `__LINE__` change.
fn line_macro_only(a: &[String], b: &[String]) -> Option<i64> {
    if a.len() != b.len() {
        return None;
    }
    let mut delta = None;
    for (x, y) in a.iter().zip(b) {
        if x == y {
            continue;
        }
        // __LINE__ reaches code as an argument or a stored value, not as an operand
        // of arithmetic.
        let head = x.split_whitespace().next().unwrap_or("");
        if !(head.starts_with("mov")
            || head.starts_with("push")
            || crate::model::DATA_DIRECTIVES.contains(&head))
        {
            return None;
        }
        let (tx, ty) = (tokenize(x), tokenize(y));
        if tx.len() != ty.len() {
            return None;
        }
        for (p, q) in tx.iter().zip(&ty) {
            let (sp, sq) = (&x[p.span.clone()], &y[q.span.clone()]);
            if sp == sq {
                continue;
            }
            if p.kind != TokKind::Num || q.kind != TokKind::Num {
                return None;
            }
            let (vp, vq) = (sp.parse::<i64>().ok()?, sq.parse::<i64>().ok()?);
            // Small constants are far more likely real changes than line numbers.
            if vp < MIN_LINE_NUMBER || vq < MIN_LINE_NUMBER {
                return None;
            }
            let d = vq - vp;
            if d == 0 || delta.is_some_and(|e| e != d) {
                return None;
            }
            delta = Some(d);
        }
    }
    delta
}

/// Line number of the first `.loc` inside a function, when built with `-g`.
fn first_loc_line(m: &Model, fi: usize) -> Option<i64> {
    let f = &m.funcs[fi];
    (f.start..=f.end)
        .map(|i| m.stmt(i))
        .find(|s| s.head == ".loc")
        .and_then(|s| s.args().split_whitespace().nth(1)?.parse().ok())
}
