//! Block model of one assembly file: sections, functions (with their `.cold`
//! parts and jump tables), variables, literals and `.comm` symbols.

use std::collections::{HashMap, HashSet};

use crate::parse::{parse, Kind, Parsed, Stmt, TokKind};

/// What a section holds, as far as patching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecKind {
    /// Executable code.
    Text,
    /// Initialised data (including read-only).
    Data,
    /// Zero-initialised data.
    Bss,
    /// Thread-local data or bss.
    Tls,
    /// DWARF debug sections.
    Debug,
    /// `.init_array`, `.fini_array`, `.ctors`, `.dtors`.
    InitArray,
    /// Anything else (notes, comments).
    Other,
}

/// A section as first declared.
#[derive(Debug, Clone)]
pub struct Section {
    /// Section name.
    pub name: String,
    /// Its class.
    pub kind: SecKind,
    /// `,"flags",@type…` part of the first declaration that had one.
    pub decl: String,
}

/// A function: from its label to its `.size`, cold parts and jump tables included.
#[derive(Debug, Clone)]
pub struct Func<'a> {
    /// Symbol name.
    pub name: &'a str,
    /// Statement index of the label.
    pub start: usize,
    /// Statement index of the closing `.size` (inclusive).
    pub end: usize,
    /// Names of split parts (`foo.cold`).
    pub parts: Vec<&'a str>,
    /// Section index at the label.
    pub section: usize,
}

/// A labelled data block outside functions (variable or literal).
#[derive(Debug, Clone)]
pub struct Data<'a> {
    /// Label.
    pub name: &'a str,
    /// Statement index of the label.
    pub label: usize,
    /// First statement of the preamble (alignment, `.type`, `.size`).
    pub start: usize,
    /// One past the last content statement.
    pub end: usize,
    /// Section index.
    pub section: usize,
}

/// A `.comm`/`.lcomm` symbol.
#[derive(Debug, Clone)]
pub struct Comm<'a> {
    /// Symbol name.
    pub name: &'a str,
    /// Statement index.
    pub stmt: usize,
    /// Normalised `size,align` text.
    pub shape: String,
}

/// Where a symbol is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Def {
    /// A function (index into `funcs`).
    Func(usize),
    /// A label inside function `.0` (cold part, local label, jump table).
    InFunc(usize),
    /// A data block.
    Data(usize),
    /// A `.comm` symbol.
    Comm(usize),
    /// A label elsewhere (e.g. `.Ltext0`).
    Other,
}

/// The model of one file.
pub struct Model<'a> {
    /// The parsed statements.
    pub p: Parsed<'a>,
    /// Section index current after each statement.
    pub sec_of: Vec<u32>,
    /// Whether a statement switches section.
    pub switch: Vec<bool>,
    /// Sections by index.
    pub sections: Vec<Section>,
    /// Functions in file order.
    pub funcs: Vec<Func<'a>>,
    /// Data blocks in file order.
    pub datas: Vec<Data<'a>>,
    /// `.comm` symbols.
    pub comms: Vec<Comm<'a>>,
    /// Definitions by name.
    pub defs: HashMap<&'a str, Def>,
    /// Symbols made global or weak.
    pub globals: HashSet<&'a str>,
    /// Statement indexes in `.init_array`-like sections.
    pub init_stmts: Vec<usize>,
    /// Canonical keys of defined symbols whose names carry compiler numbers.
    pub canon: HashMap<&'a str, String>,
}

/// Directives that emit data.
pub const DATA_DIRECTIVES: &[&str] = &[
    ".byte",
    ".short",
    ".value",
    ".word",
    ".hword",
    ".long",
    ".int",
    ".quad",
    ".octa",
    ".string",
    ".ascii",
    ".asciz",
    ".string8",
    ".string16",
    ".zero",
    ".skip",
    ".space",
    ".float",
    ".double",
    ".single",
    ".uleb128",
    ".sleb128",
    ".dc.a",
    ".dc.b",
    ".dc.w",
    ".dc.l",
    ".dc.d",
    ".dc.s",
    ".fill",
    ".base64",
    ".nops",
    ".reloc",
];

/// Directives whose meaning we know (others are reported with `--verbose`).
pub const KNOWN_DIRECTIVES: &[&str] = &[
    ".file",
    ".loc",
    ".loc_mark_labels",
    ".text",
    ".data",
    ".bss",
    ".section",
    ".pushsection",
    ".popsection",
    ".previous",
    ".subsection",
    ".globl",
    ".global",
    ".local",
    ".weak",
    ".hidden",
    ".protected",
    ".internal",
    ".type",
    ".size",
    ".align",
    ".p2align",
    ".balign",
    ".comm",
    ".lcomm",
    ".ident",
    ".set",
    ".equ",
    ".symver",
    ".weakref",
    ".intel_syntax",
    ".att_syntax",
    ".code64",
    ".code32",
    ".code16",
];

impl<'a> Model<'a> {
    /// Parses and models `src`.
    pub fn new(src: &'a str) -> Model<'a> {
        let p = parse(src);
        let n = p.stmts.len();
        let mut m = Model {
            p,
            sec_of: Vec::with_capacity(n),
            switch: Vec::with_capacity(n),
            sections: Vec::new(),
            funcs: Vec::new(),
            datas: Vec::new(),
            comms: Vec::new(),
            defs: HashMap::new(),
            globals: HashSet::new(),
            init_stmts: Vec::new(),
            canon: HashMap::new(),
        };
        m.track_sections();
        m.find_blocks();
        m.canonicalise();
        m
    }

    /// A statement.
    pub fn stmt(&self, i: usize) -> &Stmt<'a> {
        &self.p.stmts[i]
    }

    /// Section of statement `i` (after it executes).
    pub fn section(&self, i: usize) -> &Section {
        &self.sections[self.sec_of[i] as usize]
    }

    fn intern(&mut self, names: &mut HashMap<String, u32>, name: &str, decl: &str) -> u32 {
        if let Some(&i) = names.get(name) {
            let s = &mut self.sections[i as usize];
            if s.decl.is_empty() && !decl.is_empty() {
                s.decl = decl.to_string();
                s.kind = sec_kind(name, decl);
            }
            return i;
        }
        let i = self.sections.len() as u32;
        self.sections.push(Section {
            name: name.to_string(),
            kind: sec_kind(name, decl),
            decl: decl.to_string(),
        });
        names.insert(name.to_string(), i);
        i
    }

    fn track_sections(&mut self) {
        let mut names = HashMap::new();
        let mut cur = self.intern(&mut names, ".text", "");
        let mut prev = cur;
        let mut stack: Vec<(u32, u32)> = Vec::new();
        for i in 0..self.p.stmts.len() {
            let s = &self.p.stmts[i];
            let (skind, head, args) = (s.kind.clone(), s.head, s.args());
            let before = cur;
            if skind == Kind::Directive {
                match head {
                    ".text" | ".data" | ".bss" => {
                        let name = head.to_string();
                        prev = cur;
                        cur = self.intern(&mut names, &name, "");
                    }
                    ".section" | ".pushsection" => {
                        let (name, decl) = split_section_args(args);
                        let (name, decl) = (name.to_string(), decl.to_string());
                        if head == ".pushsection" {
                            stack.push((cur, prev));
                        }
                        prev = cur;
                        cur = self.intern(&mut names, &name, &decl);
                    }
                    ".popsection" => {
                        if let Some((c, p)) = stack.pop() {
                            cur = c;
                            prev = p;
                        }
                    }
                    ".previous" => std::mem::swap(&mut cur, &mut prev),
                    _ => {}
                }
            }
            self.switch
                .push(before != cur || matches!(head, ".section" | ".text" | ".data" | ".bss"));
            self.sec_of.push(cur);
        }
    }

    fn find_blocks(&mut self) {
        let stmts = &self.p.stmts;
        let mut ftypes: HashSet<&'a str> = HashSet::new();
        for s in stmts {
            if s.kind == Kind::Directive {
                match s.head {
                    ".type" => {
                        let a = s.args();
                        if a.contains("function") || a.contains("STT_FUNC") {
                            if let Some(n) = first_sym(a) {
                                ftypes.insert(n);
                            }
                        }
                    }
                    ".globl" | ".global" | ".weak" => {
                        for n in s.args().split(',') {
                            self.globals.insert(n.trim());
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut open: Option<usize> = None;
        let mut i = 0;
        while i < stmts.len() {
            let s = &stmts[i];
            let kind = self.sections[self.sec_of[i] as usize].kind;
            if matches!(kind, SecKind::InitArray) && s.kind != Kind::Blank {
                self.init_stmts.push(i);
            }
            match s.kind {
                Kind::Label => {
                    let name = s.head;
                    if ftypes.contains(name) {
                        if let Some(f) = open {
                            self.funcs[f].parts.push(name);
                            self.defs.insert(name, Def::InFunc(f));
                        } else {
                            let section = self.sec_of[i] as usize;
                            self.funcs.push(Func {
                                name,
                                start: i,
                                end: i,
                                parts: Vec::new(),
                                section,
                            });
                            let fi = self.funcs.len() - 1;
                            self.defs.insert(name, Def::Func(fi));
                            open = Some(fi);
                        }
                    } else if let Some(f) = open {
                        self.defs.insert(name, Def::InFunc(f));
                    } else if matches!(
                        kind,
                        SecKind::Data | SecKind::Bss | SecKind::Tls | SecKind::InitArray
                    ) {
                        let end = self.data_end(i + 1);
                        let start = self.preamble_start(i);
                        self.datas.push(Data {
                            name,
                            label: i,
                            start,
                            end,
                            section: self.sec_of[i] as usize,
                        });
                        self.defs.insert(name, Def::Data(self.datas.len() - 1));
                    } else {
                        self.defs.entry(name).or_insert(Def::Other);
                    }
                }
                Kind::Directive => match s.head {
                    ".size" => {
                        if let Some(f) = open {
                            if first_sym(s.args()) == Some(self.funcs[f].name) {
                                self.funcs[f].end = i;
                                open = None;
                            }
                        }
                    }
                    ".comm" | ".lcomm" => {
                        let a = s.args();
                        if let Some(n) = first_sym(a) {
                            let shape = a[a.find(',').unwrap_or(a.len())..].replace(' ', "");
                            self.comms.push(Comm {
                                name: n,
                                stmt: i,
                                shape,
                            });
                            self.defs.insert(n, Def::Comm(self.comms.len() - 1));
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
            if let Some(f) = open {
                self.funcs[f].end = i;
            }
            i += 1;
        }
    }

    fn data_end(&self, mut i: usize) -> usize {
        while i < self.p.stmts.len() {
            let s = &self.p.stmts[i];
            let stop = match s.kind {
                Kind::Label => true,
                Kind::Blank => false,
                Kind::Instruction => false,
                Kind::Directive => !DATA_DIRECTIVES.contains(&s.head),
            };
            if stop {
                break;
            }
            i += 1;
        }
        i
    }

    fn preamble_start(&self, label: usize) -> usize {
        let mut i = label;
        while i > 0 {
            let s = &self.p.stmts[i - 1];
            let ok = match s.kind {
                Kind::Blank => true,
                Kind::Directive => matches!(
                    s.head,
                    ".align"
                        | ".p2align"
                        | ".balign"
                        | ".type"
                        | ".size"
                        | ".globl"
                        | ".global"
                        | ".local"
                        | ".weak"
                ),
                _ => false,
            };
            if !ok || self.sec_of[i - 1] != self.sec_of[label] && s.head != ".globl" {
                break;
            }
            i -= 1;
        }
        i
    }

    /// Gives every defined symbol with compiler numbers (`x.3`, `f.part.0`,
    /// `CSWTCH.12`) a key independent of the numbering: the pattern with the
    /// digits replaced and the rank among same-pattern names.
    fn canonicalise(&mut self) {
        // Functions first (clones: `f.part.0`, `f.cold`), ranked by number.
        let is_code = |d: &Def| matches!(d, Def::Func(_) | Def::InFunc(_));
        let mut groups: HashMap<String, Vec<(Vec<u64>, &'a str)>> = HashMap::new();
        for (&name, _) in self
            .defs
            .iter()
            .filter(|(n, d)| !n.starts_with(".L") && is_code(d))
        {
            if let Some((pat, nums)) = numbered_pattern(name) {
                groups.entry(pat).or_default().push((nums, name));
            }
        }
        for (pat, mut v) in groups {
            v.sort();
            for (rank, (_, name)) in v.into_iter().enumerate() {
                self.canon.insert(name, format!("{pat}#{rank}"));
            }
        }
        // Numbered data (static locals `n.3`, `CSWTCH.7`) belongs to the first
        // function that uses it: adding a static elsewhere renumbers them all,
        // and a global rank would then pair one function's static with another's.
        let numbered: HashSet<&'a str> = self
            .defs
            .iter()
            .filter(|(n, d)| !n.starts_with(".L") && matches!(d, Def::Data(_) | Def::Comm(_)))
            .filter(|(n, _)| n.contains('.'))
            .map(|(n, _)| *n)
            .collect();
        let mut owner: HashMap<&'a str, &'a str> = HashMap::new();
        if !numbered.is_empty() {
            for f in &self.funcs {
                for s in &self.p.stmts[f.start..=f.end] {
                    if !matches!(s.kind, Kind::Instruction | Kind::Directive)
                        || !s.text.contains('.')
                    {
                        continue;
                    }
                    let args = s.args();
                    for t in crate::parse::tokenize(args) {
                        let n = &args[t.span];
                        if t.kind == TokKind::Sym && numbered.contains(n) {
                            owner
                                .entry(numbered.get(n).copied().unwrap_or(n))
                                .or_insert(f.name);
                        }
                    }
                }
            }
        }
        let mut groups: HashMap<(String, String), Ranked<'a>> = HashMap::new();
        for &name in &numbered {
            if let Some((pat, nums)) = numbered_pattern(name) {
                let own = owner
                    .get(name)
                    .map(|f| self.key(f).to_string())
                    .unwrap_or_default();
                groups.entry((pat, own)).or_default().push((nums, name));
            }
        }
        for ((pat, own), mut v) in groups {
            v.sort();
            for (rank, (_, name)) in v.into_iter().enumerate() {
                self.canon.insert(name, format!("{pat}@{own}#{rank}"));
            }
        }
    }

    /// Canonical key of a symbol name (itself when it carries no numbers).
    pub fn key<'s>(&'s self, name: &'s str) -> &'s str {
        self.canon.get(name).map(String::as_str).unwrap_or(name)
    }

    /// Whether a data block is constant data private to this file (`.LC*`
    /// literals, `CSWTCH.*` switch tables, `__func__.*`, local `static const`
    /// arrays): patch code gets its own copy instead of sharing the original.
    pub fn is_literal(&self, di: usize) -> bool {
        let d = &self.datas[di];
        if d.name.starts_with(".L") {
            return true;
        }
        let sec = &self.sections[d.section];
        let flags = sec.decl.split('"').nth(1).unwrap_or("");
        let read_only =
            sec.name.starts_with(".rodata") || (!sec.decl.is_empty() && !flags.contains('w'));
        sec.kind == SecKind::Data && read_only && !self.globals.contains(d.name)
    }

    /// Alignment directive text of a data block's preamble.
    pub fn data_align(&self, d: &Data) -> String {
        (d.start..d.label)
            .map(|i| self.stmt(i))
            .filter(|s| matches!(s.head, ".align" | ".p2align" | ".balign"))
            .map(|s| format!("{} {}", s.head, s.args()))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Names of one pattern with their numbers, to be ranked.
type Ranked<'a> = Vec<(Vec<u64>, &'a str)>;

/// Splits `.section` arguments into the name and the rest.
pub fn split_section_args(args: &str) -> (&str, &str) {
    let args = args.trim();
    if let Some(rest) = args.strip_prefix('"') {
        let end = rest.find('"').unwrap_or(rest.len());
        return (&rest[..end], rest[(end + 1).min(rest.len())..].trim());
    }
    match args.find(',') {
        Some(c) => (args[..c].trim(), args[c..].trim()),
        None => (args, ""),
    }
}

fn sec_kind(name: &str, decl: &str) -> SecKind {
    let flags = decl.split('"').nth(1).unwrap_or("");
    if name.starts_with(".debug") || name.starts_with(".zdebug") {
        SecKind::Debug
    } else if name.starts_with(".text") || flags.contains('x') {
        SecKind::Text
    } else if name.starts_with(".tbss") || name.starts_with(".tdata") || flags.contains('T') {
        SecKind::Tls
    } else if [
        ".init_array",
        ".fini_array",
        ".ctors",
        ".dtors",
        ".preinit_array",
    ]
    .iter()
    .any(|p| name.starts_with(p))
    {
        SecKind::InitArray
    } else if name.starts_with(".bss") || decl.contains("@nobits") {
        SecKind::Bss
    } else if name.starts_with(".data") || name.starts_with(".rodata") || flags.contains('a') {
        SecKind::Data
    } else {
        SecKind::Other
    }
}

/// The first symbol token of a directive's arguments.
pub fn first_sym(args: &str) -> Option<&str> {
    crate::parse::tokenize(args)
        .into_iter()
        .find(|t| t.kind == TokKind::Sym)
        .map(|t| &args[t.span])
}

/// `foo.part.3` → (`foo.part.#`, [3]); `None` without numeric segments.
fn numbered_pattern(name: &str) -> Option<(String, Vec<u64>)> {
    let mut pat = String::with_capacity(name.len());
    let mut nums = Vec::new();
    for (k, seg) in name.split('.').enumerate() {
        if k > 0 {
            pat.push('.');
        }
        if k > 0 && !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            pat.push('#');
            nums.push(seg.parse().unwrap_or(u64::MAX));
        } else {
            pat.push_str(seg);
        }
    }
    (!nums.is_empty()).then_some((pat, nums))
}

/// A section name with compiler numbers masked (`.bss.seen.3` → `.bss.seen.#`):
/// with `-fdata-sections` the name carries the symbol's number.
pub fn section_key(name: &str) -> String {
    numbered_pattern(name)
        .map(|(p, _)| p)
        .unwrap_or_else(|| name.to_string())
}
