//! Emission of the augmented assembly: the original verbatim (plus end labels,
//! which assemble to nothing), then the `.kpatch.*` sections.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use crate::diff::{func_labels, is_debug_directive, section_flavour, Var};
use crate::model::{Def, Model, SecKind};
use crate::parse::{rename_syms, tokenize, Kind, TokKind};
use crate::Options;

/// Size of one `.kpatch.info` record (LibCare `struct kpatch_info`).
pub const KPATCH_INFO_SIZE: usize = 48;

/// What to emit, as decided by the diff.
pub(crate) struct Plan<'x, 'a> {
    pub o: &'x Model<'a>,
    pub p: &'x Model<'a>,
    /// (original function, patched function) pairs that changed.
    pub changed: &'x [(usize, usize)],
    /// Patched functions new in this version.
    pub added: &'x [usize],
    /// New variables of the patched file.
    pub new_vars: &'x [Var],
    /// Patched variable name → name to reference (original's or new copy's).
    pub var_map: &'x HashMap<&'a str, String>,
}

struct Emitter<'x, 'a> {
    plan: &'x Plan<'x, 'a>,
    opts: &'x Options,
    /// Patched function/part name → name of its `.kpatch` copy.
    copy_name: HashMap<&'a str, String>,
    /// Canonical key → original name (functions and their parts).
    orig_by_key: HashMap<&'x str, &'a str>,
    /// Literal blocks of the patched file to copy into `.kpatch.data`.
    literals: Vec<usize>,
    literal_seen: HashSet<usize>,
    /// How many of `literals` are already emitted.
    literals_done: usize,
    out: String,
    warnings: Vec<String>,
}

/// Emits the augmented assembly.
pub(crate) fn emit(plan: &Plan, opts: &Options, warnings: &mut Vec<String>) -> String {
    let (o, p) = (plan.o, plan.p);
    let mut copy_name = HashMap::new();
    for &(ofi, pfi) in plan.changed {
        copy_name.insert(p.funcs[pfi].name, format!("{}.kpatch", o.funcs[ofi].name));
    }
    for &pfi in plan.added {
        copy_name.insert(p.funcs[pfi].name, format!("{}.kpatch", p.funcs[pfi].name));
    }
    for &pfi in plan.changed.iter().map(|(_, p)| p).chain(plan.added) {
        for part in &p.funcs[pfi].parts {
            copy_name.insert(part, format!("{part}.kpatch"));
        }
    }
    let mut orig_by_key = HashMap::new();
    for (name, def) in &o.defs {
        if matches!(def, Def::Func(_) | Def::InFunc(_)) && !name.starts_with(".L") {
            orig_by_key.insert(o.key(name), *name);
        }
    }
    let mut e = Emitter {
        plan,
        opts,
        copy_name,
        orig_by_key,
        literals: Vec::new(),
        literal_seen: HashSet::new(),
        literals_done: 0,
        out: String::with_capacity(o.p.src.len() + 4096),
        warnings: Vec::new(),
    };
    e.original();
    e.out.push_str("\n# livecare: patch code and data\n");
    let data_at = e.out.len();
    let mut records = Vec::new();
    for (k, &(ofi, pfi)) in plan.changed.iter().enumerate() {
        let end = e.copy_function(pfi, &format!(".Lkpatch_nend{k}"));
        records.push((
            o.funcs[ofi].name,
            e.copy_name[p.funcs[pfi].name].clone(),
            k,
            end,
        ));
    }
    for (k, &pfi) in plan.added.iter().enumerate() {
        e.copy_function(pfi, &format!(".Lkpatch_aend{k}"));
    }
    e.copy_literals();
    for &v in plan.new_vars {
        e.copy_variable(v);
    }
    e.copy_literals();
    if opts.force_global {
        let mut names: Vec<String> = records.iter().map(|r| r.0.to_string()).collect();
        names.extend(e.copy_name.values().cloned());
        names.sort();
        names.dedup();
        for n in names {
            let _ = writeln!(e.out, "\t.globl\t{n}");
            // A symbol that was local must not become preemptible: in a shared
            // library the linker would route the original's calls through the
            // PLT (or refuse), changing the original code.
            if !o.globals.contains(n.as_str()) {
                let _ = writeln!(e.out, "\t.hidden\t{n}");
            }
        }
    }
    e.info(&records);
    // New data starts on a page of its own, after all patch code in the file: an
    // applier that maps the patch file as it is (LibcarePlus) makes everything before
    // `.kpatch.data`'s file offset read+exec and leaves the rest writable.
    if e.out[data_at..].contains(".kpatch.data,") {
        e.out.insert_str(
            data_at,
            "\t.pushsection\t.kpatch.data,\"aw\",@progbits\n\t.p2align\t12\n\t.popsection\n",
        );
    }
    warnings.append(&mut e.warnings);
    e.out
}

impl<'x, 'a> Emitter<'x, 'a> {
    /// The original text, with an end label before each changed function's `.size`.
    fn original(&mut self) {
        let o = self.plan.o;
        let mut insert: HashMap<usize, String> = HashMap::new();
        for (k, &(ofi, _)) in self.plan.changed.iter().enumerate() {
            let f = &o.funcs[ofi];
            let s = o.stmt(f.end);
            if s.head == ".size" {
                insert.insert(s.line, format!(".Lkpatch_oend{k}:\n"));
            } else {
                // No `.size`: the function runs to its last statement.
                insert.insert(s.line + 1, format!(".Lkpatch_oend{k}:\n"));
            }
        }
        let n = o.p.lines.len();
        for (ln, line) in o.p.lines.iter().enumerate() {
            if let Some(l) = insert.get(&ln) {
                self.out.push_str(l);
            }
            self.out.push_str(line);
            if ln + 1 < n {
                self.out.push('\n');
            }
        }
        if !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        if let Some(l) = insert.get(&n) {
            self.out.push_str(l);
        }
    }

    /// How patch code names patched-file symbol `name`; `None` keeps it.
    fn map_sym(&mut self, name: &str, locals: Option<&HashMap<&str, usize>>) -> Option<String> {
        if let Some(n) = self.copy_name.get(name) {
            return Some(n.clone());
        }
        if locals.is_some_and(|l| l.contains_key(name)) {
            return Some(format!("{name}.kpatch"));
        }
        let p = self.plan.p;
        match p.defs.get(name).copied() {
            // The original coverage record of this file, not a copy.
            Some(Def::Data(_)) if crate::diff::is_instrumentation(name) => Some(name.to_string()),
            Some(Def::Data(di)) if p.is_literal(di) => {
                if self.literal_seen.insert(di) {
                    self.literals.push(di);
                }
                Some(format!("{name}.kpatch"))
            }
            Some(Def::Data(_)) | Some(Def::Comm(_)) => self.plan.var_map.get(name).cloned(),
            Some(Def::Func(_)) | Some(Def::InFunc(_)) if !name.starts_with(".L") => {
                self.orig_by_key.get(p.key(name)).map(|n| n.to_string())
            }
            _ => None,
        }
    }

    /// Whether `name` (as referenced from patch code) is data outside the patch.
    fn is_foreign_data(&self, name: &str) -> bool {
        let p = self.plan.p;
        match p.defs.get(name) {
            None => true,
            Some(Def::Comm(_)) => self
                .plan
                .var_map
                .get(name)
                .is_some_and(|n| !n.ends_with(".kpatch")),
            Some(Def::Data(_)) => {
                !name.starts_with(".L")
                    && self
                        .plan
                        .var_map
                        .get(name)
                        .is_some_and(|n| !n.ends_with(".kpatch"))
            }
            _ => false,
        }
    }

    fn rename(&mut self, args: &str, locals: Option<&HashMap<&str, usize>>) -> String {
        let mut pending = Vec::new();
        let r = rename_syms(args, |s| {
            pending.push(s.to_string());
            None
        });
        let mut map = HashMap::new();
        for s in pending {
            if let Some(n) = self.map_sym(&s, locals) {
                map.insert(s, n);
            }
        }
        if map.is_empty() {
            return r;
        }
        rename_syms(args, |s| map.get(s).cloned())
    }

    fn section_line(&self, kind: SecKind, flavour: &str) -> &'static str {
        match (kind, flavour) {
            (SecKind::Text, "cold") => "\t.section\t.kpatch.text.unlikely,\"ax\",@progbits",
            (SecKind::Text, _) => "\t.section\t.kpatch.text,\"ax\",@progbits",
            // Zeroed data too: a NOBITS section would overlap whatever follows it in
            // the file, where appliers that map the file as it is put it.
            _ => "\t.section\t.kpatch.data,\"aw\",@progbits",
        }
    }

    /// Copies a patched function under its `.kpatch` name; returns its end label.
    fn copy_function(&mut self, pfi: usize, end_label: &str) -> String {
        let p = self.plan.p;
        let f = &p.funcs[pfi];
        let (locals, referenced) = func_labels(p, pfi);
        let start_sec = &p.sections[f.section];
        let _ = writeln!(
            self.out,
            "{}",
            self.section_line(SecKind::Text, section_flavour(&start_sec.name))
        );
        self.out.push_str("\t.p2align 4\n");
        let cname = self.copy_name[f.name].clone();
        let _ = writeln!(self.out, "\t.type\t{cname}, @function");
        let mut end_done = false;
        for i in f.start..=f.end {
            let s = p.stmt(i);
            match s.kind {
                Kind::Blank => {}
                Kind::Label => {
                    if i == f.start || f.parts.contains(&s.head) || referenced.contains(s.head) {
                        let n = self
                            .map_sym(s.head, Some(&locals))
                            .unwrap_or_else(|| s.head.to_string());
                        let _ = writeln!(self.out, "{n}:");
                    }
                }
                Kind::Directive if is_debug_directive(s.head) => {}
                Kind::Directive if p.switch[i] => {
                    let sec = p.section(i);
                    let line = self.section_line(sec.kind, section_flavour(&sec.name));
                    let _ = writeln!(self.out, "{line}");
                }
                _ => {
                    if i == f.end && s.head == ".size" {
                        let _ = writeln!(self.out, "{end_label}:");
                        end_done = true;
                    }
                    let args = s.args();
                    let head = &s.text[..s.text.len() - args.len()];
                    let renamed = self.rename(args, Some(&locals));
                    let line = format!(
                        "{}{}",
                        head.trim_end(),
                        if renamed.is_empty() {
                            String::new()
                        } else {
                            format!("\t{renamed}")
                        }
                    );
                    if self.opts.force_gotpcrel && s.kind == Kind::Instruction {
                        self.gotpcrel(s.head, head, args, &renamed, f.name);
                    } else {
                        let _ = writeln!(self.out, "\t{}", line.trim_start());
                    }
                }
            }
        }
        if !end_done {
            let _ = writeln!(self.out, "{end_label}:");
        }
        end_label.to_string()
    }

    /// Emits one instruction, routing a RIP-relative reference to foreign data
    /// through the GOT when that can be done without a spare register.
    fn gotpcrel(&mut self, mnemonic: &str, head: &str, orig_args: &str, args: &str, func: &str) {
        let plain = format!("\t{}\t{}\n", head.trim(), args);
        let toks = tokenize(orig_args);
        // Find `sym [+-off] ( %rip )` without an `@` suffix.
        let mut hit = None;
        for (k, t) in toks.iter().enumerate() {
            if t.kind != TokKind::Sym || !self.is_foreign_data(&orig_args[t.span.clone()]) {
                continue;
            }
            let txt = |j: usize| {
                toks.get(j)
                    .map(|t| &orig_args[t.span.clone()])
                    .unwrap_or("")
            };
            let mut j = k + 1;
            let mut off = String::new();
            while j < toks.len() && txt(j) != "(" && txt(j) != "," && txt(j) != "@" {
                off.push_str(txt(j));
                j += 1;
            }
            if txt(j) == "(" && txt(j + 1) == "%rip" && txt(j + 2) == ")" {
                hit = Some((k, off, toks[j + 2].span.end));
                break;
            }
        }
        let Some((k, off, mem_end)) = hit else {
            self.out.push_str(&plain);
            return;
        };
        let sym = self
            .map_sym(&orig_args[toks[k].span.clone()], None)
            .unwrap_or_else(|| orig_args[toks[k].span.clone()].to_string());
        let rest = orig_args[mem_end..].trim_start();
        let dest = rest.strip_prefix(',').map(str::trim);
        let before = orig_args[..toks[k].span.start].trim();
        let dest64 = dest.and_then(gpr64);
        match (mnemonic, dest64) {
            ("leaq", Some(d)) if before.is_empty() => {
                let _ = writeln!(self.out, "\tmovq\t{sym}@GOTPCREL(%rip), {d}");
                if !off.is_empty() {
                    let _ = writeln!(self.out, "\tleaq\t{off}({d}), {d}");
                }
            }
            (m, Some(d))
                if before.is_empty()
                    && m.starts_with("mov")
                    && !m.starts_with("movs")
                        | m.starts_with("movsb")
                        | m.starts_with("movsw")
                        | m.starts_with("movsl")
                    && !m.contains("ap")
                    && !m.contains("up")
                    && !m.contains("dq") =>
            {
                let dest = dest.unwrap_or_default();
                let _ = writeln!(self.out, "\tmovq\t{sym}@GOTPCREL(%rip), {d}");
                let _ = writeln!(
                    self.out,
                    "\t{}\t{}({d}), {dest}",
                    head.trim(),
                    off.trim_start_matches('+')
                );
            }
            _ => {
                self.warnings.push(format!(
                    "--force-gotpcrel: `{} {}` in `{func}` keeps a direct reference to `{sym}` (no free register to load its GOT entry)",
                    head.trim(),
                    orig_args
                ));
                self.out.push_str(&plain);
            }
        }
    }

    fn copy_literals(&mut self) {
        let p = self.plan.p;
        while self.literals_done < self.literals.len() {
            let di = self.literals[self.literals_done];
            self.literals_done += 1;
            let d = &p.datas[di];
            let kind = p.sections[d.section].kind;
            let _ = writeln!(self.out, "{}", self.section_line(kind, ""));
            for i in d.start..d.label {
                let s = p.stmt(i);
                if matches!(s.head, ".align" | ".p2align" | ".balign") {
                    let _ = writeln!(self.out, "\t{}", s.text);
                }
            }
            let _ = writeln!(self.out, "{}.kpatch:", d.name);
            self.copy_content(d.label + 1, d.end);
        }
    }

    fn copy_content(&mut self, from: usize, to: usize) {
        let p = self.plan.p;
        for i in from..to {
            let s = p.stmt(i);
            if s.kind == Kind::Blank {
                continue;
            }
            let args = s.args();
            let head = s.text[..s.text.len() - args.len()].trim();
            let renamed = self.rename(args, None);
            let _ = writeln!(self.out, "\t{head}\t{renamed}");
        }
    }

    fn copy_variable(&mut self, v: Var) {
        let p = self.plan.p;
        match v {
            Var::Data(di) => {
                let d = &p.datas[di];
                let kind = p.sections[d.section].kind;
                let _ = writeln!(self.out, "{}", self.section_line(kind, ""));
                let new = self.plan.var_map[d.name].clone();
                // gcc puts `.globl` before the section switch, outside the block.
                if p.globals.contains(d.name) {
                    let _ = writeln!(self.out, "\t.globl\t{new}");
                }
                for i in d.start..d.label {
                    let s = p.stmt(i);
                    if s.kind == Kind::Directive && !matches!(s.head, ".globl" | ".global") {
                        let args = s.args();
                        let renamed = rename_syms(args, |x| (x == d.name).then(|| new.clone()));
                        let _ = writeln!(self.out, "\t{}\t{renamed}", s.head);
                    }
                }
                let _ = writeln!(self.out, "{new}:");
                self.copy_content(d.label + 1, d.end);
            }
            Var::Comm(ci) => {
                let c = &p.comms[ci];
                let new = self.plan.var_map[c.name].clone();
                let mut it = c.shape.trim_start_matches(',').split(',');
                let size = it.next().unwrap_or("0").to_string();
                let align = it.next().unwrap_or("1").to_string();
                let _ = writeln!(self.out, "{}", self.section_line(SecKind::Bss, ""));
                if p.globals.contains(c.name)
                    || p.stmt(c.stmt).head == ".comm" && !new.ends_with(".kpatch")
                {
                    let _ = writeln!(self.out, "\t.globl\t{new}");
                }
                let _ = writeln!(self.out, "\t.balign\t{align}\n\t.type\t{new}, @object\n\t.size\t{new}, {size}\n{new}:\n\t.zero\t{size}");
            }
        }
    }

    /// `.kpatch.strtab` names and `.kpatch.info` records, ending with a zero record.
    fn info(&mut self, records: &[(&str, String, usize, String)]) {
        if records.is_empty() {
            return;
        }
        self.out
            .push_str("\t.section\t.kpatch.strtab,\"a\",@progbits\n");
        for (name, _, k, _) in records {
            let _ = writeln!(self.out, ".Lkpatch_str{k}:\n\t.string\t\"{name}\"");
        }
        self.out
            .push_str("\t.section\t.kpatch.info,\"aw\",@progbits\n\t.balign\t8\n");
        for (name, copy, k, end) in records {
            let _ = writeln!(
                self.out,
                "\t.quad\t{name}\n\t.quad\t{copy}\n\t.long\t.Lkpatch_oend{k}-{name}\n\t.long\t{end}-{copy}\n\t.quad\t.Lkpatch_str{k}\n\t.quad\t0\n\t.long\t0\n\t.long\t0"
            );
        }
        // The all-zero record that ends the array.
        let _ = writeln!(self.out, "\t.zero\t{KPATCH_INFO_SIZE}");
    }
}

/// 64-bit name of a general-purpose register operand (`%eax` → `%rax`).
fn gpr64(reg: &str) -> Option<String> {
    let r = reg.strip_prefix('%')?;
    const LEGACY: &[(&str, &[&str])] = &[
        ("rax", &["rax", "eax", "ax", "al"]),
        ("rbx", &["rbx", "ebx", "bx", "bl"]),
        ("rcx", &["rcx", "ecx", "cx", "cl"]),
        ("rdx", &["rdx", "edx", "dx", "dl"]),
        ("rsi", &["rsi", "esi", "si", "sil"]),
        ("rdi", &["rdi", "edi", "di", "dil"]),
        ("rbp", &["rbp", "ebp", "bp", "bpl"]),
    ];
    for (full, names) in LEGACY {
        if names.contains(&r) {
            return Some(format!("%{full}"));
        }
    }
    let n = r.strip_prefix('r')?;
    let digits: String = n.chars().take_while(|c| c.is_ascii_digit()).collect();
    let suffix = &n[digits.len()..];
    let num: u8 = digits.parse().ok()?;
    ((8..=15).contains(&num) && ["", "d", "w", "b"].contains(&suffix)).then(|| format!("%r{num}"))
}

/// Lower-bound-ish estimate of the hot part's size in bytes; only used to refuse
/// functions too short for a jump, so it errs on the large side for long code.
pub(crate) fn estimate_size(m: &Model, fi: usize) -> usize {
    let f = &m.funcs[fi];
    let mut size = 0;
    for i in f.start..=f.end {
        if i > f.start && m.switch[i] {
            break;
        }
        let s = m.stmt(i);
        if s.kind == Kind::Directive && crate::model::DATA_DIRECTIVES.contains(&s.head) {
            size += 5;
        }
        if s.kind != Kind::Instruction {
            continue;
        }
        let args = s.args();
        size += match s.head {
            "ret" | "leave" | "nop" | "hlt" | "cltd" | "cwtl" | "int3" | "pushfq" | "popfq"
            | "cld" => 1,
            "endbr64" | "endbr32" => 4,
            "cltq" | "cqto" | "ud2" | "syscall" => 2,
            h if h.starts_with("push") || h.starts_with("pop") => {
                if args.contains("%r") && args.chars().any(|c| c.is_ascii_digit()) {
                    2
                } else {
                    1
                }
            }
            "jmp" | "call" if !args.starts_with('*') => 5,
            _ => 2 + operand_bytes(args),
        };
        if s.text.starts_with("rep") {
            size += 1;
        }
    }
    size
}

/// Extra bytes that operands add to a two-byte opcode+ModRM: REX, SIB,
/// displacement and immediate.
fn operand_bytes(args: &str) -> usize {
    let mut n = 0;
    if args.contains("%r") {
        n += 1;
    }
    if let Some(imm) = args.strip_prefix('$') {
        let v: Option<i64> = imm.split(',').next().and_then(|x| x.trim().parse().ok());
        n += match v {
            Some(v) if (-128..128).contains(&v) => 1,
            _ => 4,
        };
    }
    if let Some(open) = args.find('(') {
        let inner = &args[open..args[open..].find(')').map_or(args.len(), |c| open + c)];
        if inner.contains("%rip") {
            return n + 4;
        }
        if inner.contains(',') || inner.contains("%rsp") || inner.contains("%r12") {
            n += 1;
        }
        let disp = args[..open].rsplit([',', ' ']).next().unwrap_or("");
        if !disp.is_empty() {
            n += match disp.parse::<i64>() {
                Ok(v) if (-128..128).contains(&v) => 1,
                _ => 4,
            };
        }
    }
    n
}
