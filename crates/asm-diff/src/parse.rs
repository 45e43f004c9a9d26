//! Lexer and statement classifier for GNU as AT&T assembly as gcc emits it.
//!
//! Every physical line is split into statements (`;` separated, `#` comments
//! removed outside strings); every statement gets a [`Kind`]. The original text
//! is kept, so printing a parsed file reproduces it byte for byte.

use std::ops::Range;

/// What a statement is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Empty or comment-only.
    Blank,
    /// `name:` defines a label.
    Label,
    /// `.directive args`.
    Directive,
    /// A machine instruction (possibly with prefixes).
    Instruction,
}

/// One token of a statement, with its byte span in the statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What kind of token.
    pub kind: TokKind,
    /// Byte span inside the statement text.
    pub span: Range<usize>,
}

/// Token classes that matter for renaming and normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokKind {
    /// A symbol name (may be renamed).
    Sym,
    /// `%reg`.
    Reg,
    /// A number literal.
    Num,
    /// A string literal (with quotes).
    Str,
    /// A keyword after `@` (`@function`, `@PLT`, `@GOTPCREL`, `@progbits`).
    At,
    /// Any other single character.
    Punct,
}

/// A classified statement.
#[derive(Debug, Clone)]
pub struct Stmt<'a> {
    /// Statement text without comment and surrounding blanks.
    pub text: &'a str,
    /// Its class.
    pub kind: Kind,
    /// Label name, directive name, or mnemonic (without prefixes); empty for blanks.
    pub head: &'a str,
    /// Index of the physical line (0-based).
    pub line: usize,
}

impl<'a> Stmt<'a> {
    /// The text after the head (directive arguments or instruction operands).
    pub fn args(&self) -> &'a str {
        match self.kind {
            Kind::Directive | Kind::Instruction => {
                let start =
                    self.head.as_ptr() as usize - self.text.as_ptr() as usize + self.head.len();
                self.text[start..].trim()
            }
            _ => "",
        }
    }

    /// Tokens of the whole statement text.
    pub fn tokens(&self) -> Vec<Token> {
        tokenize(self.text)
    }
}

/// Instruction prefixes written as separate words by gcc.
const PREFIXES: &[&str] = &[
    "rep", "repe", "repz", "repne", "repnz", "lock", "notrack", "data16", "rex64", "addr32", "bnd",
    "cs", "ds",
];

/// A whole parsed file.
pub struct Parsed<'a> {
    /// The source text.
    pub src: &'a str,
    /// Physical lines (without the newline).
    pub lines: Vec<&'a str>,
    /// Statements in order.
    pub stmts: Vec<Stmt<'a>>,
}

impl Parsed<'_> {
    /// Prints the statements back, one per line in canonical layout (labels at
    /// column 0, everything else after a tab, comments dropped). Assembling the
    /// result gives the same object as the input.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.src.len());
        for s in &self.stmts {
            match s.kind {
                Kind::Blank => {}
                Kind::Label => {
                    out.push_str(s.text);
                    out.push('\n');
                }
                Kind::Directive | Kind::Instruction => {
                    out.push('\t');
                    out.push_str(s.text);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Splits and classifies every statement of `src`. Never fails: anything that is
/// not a label or a directive is an instruction, kept verbatim.
pub fn parse(src: &str) -> Parsed<'_> {
    let lines: Vec<&str> = src.split('\n').collect();
    let mut stmts = Vec::with_capacity(lines.len());
    for (ln, line) in lines.iter().enumerate() {
        let code = strip_comment(line);
        let mut any = false;
        for piece in split_statements(code) {
            let mut rest = piece.trim();
            // Labels may be followed by a statement on the same line.
            while let Some(len) = label_len(rest) {
                let name = &rest[..len];
                stmts.push(Stmt {
                    text: &rest[..len + 1],
                    kind: Kind::Label,
                    head: name,
                    line: ln,
                });
                any = true;
                rest = rest[len + 1..].trim_start();
            }
            if rest.is_empty() {
                continue;
            }
            any = true;
            stmts.push(classify(rest, ln));
        }
        if !any {
            stmts.push(Stmt {
                text: line.trim(),
                kind: Kind::Blank,
                head: "",
                line: ln,
            });
        }
    }
    Parsed { src, lines, stmts }
}

fn classify(text: &str, line: usize) -> Stmt<'_> {
    let first_end = text.find(|c: char| c.is_whitespace()).unwrap_or(text.len());
    let first = &text[..first_end];
    if first.starts_with('.') {
        return Stmt {
            text,
            kind: Kind::Directive,
            head: first,
            line,
        };
    }
    // Skip prefixes to find the mnemonic.
    let mut head = first;
    let mut off = 0;
    loop {
        let h = &text[off..];
        let end = h.find(|c: char| c.is_whitespace()).unwrap_or(h.len());
        let word = &h[..end];
        if PREFIXES.contains(&word) && end < h.len() {
            let next = h[end..].trim_start();
            off = text.len() - next.len();
            head = word;
            continue;
        }
        if !word.is_empty() {
            head = word;
        }
        break;
    }
    Stmt {
        text,
        kind: Kind::Instruction,
        head,
        line,
    }
}

/// Length of a leading `name:` label, if any.
fn label_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.is_empty() {
        return None;
    }
    if b[0] == b'"' {
        let end = s[1..].find('"')? + 1;
        return (b.get(end + 1) == Some(&b':')).then_some(end + 1);
    }
    if !is_sym_start(b[0]) && !b[0].is_ascii_digit() {
        return None;
    }
    let mut i = 1;
    while i < b.len() && is_sym_char(b[i]) {
        i += 1;
    }
    (b.get(i) == Some(&b':')).then_some(i)
}

/// Bytes of a UTF-8 multi-byte character (>= 0x80) are symbol characters, as in
/// gas: gcc emits C identifiers such as `café` in raw UTF-8. Treating every such byte
/// alike also keeps symbol spans on char boundaries.
fn is_sym_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b'.' || c >= 0x80
}

fn is_sym_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'$' || c >= 0x80
}

/// Removes a `#` comment that is not inside a string.
fn strip_comment(line: &str) -> &str {
    let b = line.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'#' if !in_str => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

/// Splits on `;` outside strings.
fn split_statements(code: &str) -> Vec<&str> {
    let b = code.as_bytes();
    if !code.contains(';') {
        return vec![code];
    }
    let mut out = Vec::new();
    let mut in_str = false;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b';' if !in_str => {
                out.push(&code[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&code[start..]);
    out
}

/// Tokenizes a statement text.
pub fn tokenize(s: &str) -> Vec<Token> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let kind = if c == b'%' {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            TokKind::Reg
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(b.len());
            TokKind::Str
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            TokKind::Num
        } else if is_sym_start(c) {
            while i < b.len() && is_sym_char(b[i]) {
                i += 1;
            }
            if out
                .last()
                .map(|t: &Token| t.kind == TokKind::Punct && &s[t.span.clone()] == "@")
                == Some(true)
            {
                TokKind::At
            } else {
                TokKind::Sym
            }
        } else {
            // One whole character: `i` is always on a char boundary here (every
            // other branch stops at an ASCII byte or the end), and a span must not
            // cut a multi-byte character, since callers slice the text with it.
            i += s[i..].chars().next().map_or(1, char::len_utf8);
            TokKind::Punct
        };
        out.push(Token {
            kind,
            span: start..i,
        });
    }
    out
}

/// Rebuilds `text` with every symbol token passed through `f` (which returns
/// `None` to keep it).
pub fn rename_syms(text: &str, mut f: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut last = 0;
    for t in tokenize(text) {
        if t.kind != TokKind::Sym {
            continue;
        }
        let name = &text[t.span.clone()];
        if let Some(new) = f(name) {
            out.push_str(&text[last..t.span.start]);
            out.push_str(&new);
            last = t.span.end;
        }
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_labels_directives_and_prefixed_instructions() {
        let p = parse("foo:\n\t.string \"a#b;c\" # c\n\trep stosq\n.L3: ret\n# only\n");
        let kinds: Vec<_> = p.stmts.iter().map(|s| (s.kind.clone(), s.head)).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Label, "foo"),
                (Kind::Directive, ".string"),
                (Kind::Instruction, "stosq"),
                (Kind::Label, ".L3"),
                (Kind::Instruction, "ret"),
                (Kind::Blank, ""),
                (Kind::Blank, ""),
            ]
        );
        assert_eq!(p.stmts[1].args(), "\"a#b;c\"");
    }

    #[test]
    fn utf8_identifiers_are_single_symbols_and_labels() {
        let p = parse("ÿ_func:\n\taddl\tcafé(%rip), %eax\n");
        assert_eq!(p.stmts[0].kind, Kind::Label);
        assert_eq!(p.stmts[0].head, "ÿ_func");
        let r = rename_syms(p.stmts[1].args(), |s| Some(format!("{s}.k")));
        assert_eq!(r, "café.k(%rip), %eax");
    }

    #[test]
    fn token_spans_never_cut_a_character() {
        for text in [
            "%eax, \u{55a}si",
            "\u{6d5}12, %rdi",
            "1\u{20ac}, \"\\\u{e9}\", %\u{e9}x, ×",
        ] {
            for t in tokenize(text) {
                assert!(text.is_char_boundary(t.span.start), "{text:?} {t:?}");
                assert!(text.is_char_boundary(t.span.end), "{text:?} {t:?}");
            }
        }
    }

    #[test]
    fn renames_symbols_but_not_keywords_or_registers() {
        let r = rename_syms("bar(%rip), %rax, foo@PLT", |s| Some(format!("{s}.k")));
        assert_eq!(r, "bar.k(%rip), %rax, foo.k@PLT");
    }
}
