//! Struct layouts of `bpf/sigil.h` as clang computes them for `-target bpf`, turned into Rust
//! constants. Used by `build.rs`, and compiled into the crate's unit tests (`src/abi.rs`) so the
//! parser and generator are tested like any other code.
//!
//! The numbers come from clang's record-layout dump (`-Xclang -fdump-record-layouts`) of two
//! small probes: the first lists every struct's fields with their offsets, size and alignment;
//! the second declares, per struct, `char FIELD[sizeof(((struct S *)0)->FIELD)]` for every
//! field, so the dump of that struct gives each field's size as an array length.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One struct as clang laid it out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Struct tag, without `struct`.
    pub name: String,
    /// `sizeof`.
    pub size: usize,
    /// `_Alignof`.
    pub align: usize,
    /// Top-level fields in declaration order.
    pub fields: Vec<Field>,
}

/// One top-level field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Field {
    /// Field name.
    pub name: String,
    /// Byte offset.
    pub offset: usize,
    /// The C type as clang prints it (`__u8[16]`).
    pub c_type: String,
    /// `sizeof` the field (filled in from the second probe).
    pub size: usize,
}

/// Names of the structs defined in a header: every line `struct NAME {` at column 0.
pub fn struct_names(header: &str) -> Vec<String> {
    header
        .lines()
        .filter_map(|l| l.strip_prefix("struct ")?.strip_suffix(" {"))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect()
}

/// The first probe: makes clang lay out every named struct.
pub fn layout_probe(header: &str, names: &[String]) -> String {
    let mut c = format!("#include \"{header}\"\n");
    for n in names {
        let _ = writeln!(
            c,
            "unsigned long sigil_abi_layout_{n} = sizeof(struct {n});"
        );
    }
    c
}

/// Prefix of the structs of the second probe.
const SIZE_PREFIX: &str = "sigil_abi_sizes_";

/// The second probe: one struct per record whose fields are `char` arrays as long as the
/// record's fields.
pub fn size_probe(header: &str, records: &[Record]) -> String {
    let mut c = format!("#include \"{header}\"\n");
    for r in records {
        let _ = writeln!(c, "struct {SIZE_PREFIX}{} {{", r.name);
        for f in &r.fields {
            let _ = writeln!(
                c,
                "\tchar {f}[sizeof(((struct {r} *)0)->{f})];",
                f = f.name,
                r = r.name
            );
        }
        let _ = writeln!(c, "}};");
        let _ = writeln!(
            c,
            "unsigned long {SIZE_PREFIX}{n}_size = sizeof(struct {SIZE_PREFIX}{n});",
            n = r.name
        );
    }
    c
}

/// Parses clang's `-fdump-record-layouts` output: every record with its top-level fields.
///
/// The format, per record:
/// ```text
/// *** Dumping AST Record Layout
///          0 | struct event
///          0 |   __u64 ts_ns
///         28 |   __u8[16] saddr
///            | [sizeof=72, align=8]
/// ```
/// Nested records are indented further and skipped (their fields are not top-level);
/// bit-fields (`0:0-3 |`) are refused, because no Rust type mirrors them.
pub fn parse_dump(dump: &str) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let mut cur: Option<Record> = None;
    for (i, line) in dump.lines().enumerate() {
        let lineno = i + 1;
        if line.starts_with("*** Dumping AST Record Layout") {
            if let Some(r) = cur.take() {
                return Err(format!("record {} has no [sizeof=...] line", r.name));
            }
            cur = Some(Record::default());
            continue;
        }
        let Some(r) = cur.as_mut() else { continue };
        let Some((left, right)) = line.split_once('|') else {
            continue;
        };
        let left = left.trim();
        // Indentation after the bar: one space before the record, three before its fields.
        let depth = right.len() - right.trim_start().len();
        let text = right.trim();
        if left.is_empty() {
            if let Some(attrs) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                if depth != 1 {
                    continue; // the size line of a nested record
                }
                for kv in attrs.split(',') {
                    let Some((k, v)) = kv.trim().split_once('=') else {
                        continue;
                    };
                    let v: usize = v
                        .parse()
                        .map_err(|_| format!("line {lineno}: bad number in `{kv}`"))?;
                    match k {
                        "sizeof" => r.size = v,
                        "align" => r.align = v,
                        _ => {}
                    }
                }
                if r.name.is_empty() || r.size == 0 || r.align == 0 {
                    return Err(format!("line {lineno}: incomplete record `{line}`"));
                }
                records.push(std::mem::take(r));
                cur = None;
            }
            continue;
        }
        if left.contains(':') {
            return Err(format!(
                "line {lineno}: bit-field `{text}` in struct {}: no Rust type mirrors it",
                r.name
            ));
        }
        let offset: usize = left
            .parse()
            .map_err(|_| format!("line {lineno}: bad offset `{left}`"))?;
        if depth == 1 {
            let name = text
                .strip_prefix("struct ")
                .ok_or_else(|| format!("line {lineno}: expected `struct NAME`, got `{text}`"))?;
            r.name = name.to_owned();
        } else if depth == 3 {
            let (c_type, name) = text
                .rsplit_once(' ')
                .ok_or_else(|| format!("line {lineno}: expected `TYPE NAME`, got `{text}`"))?;
            r.fields.push(Field {
                name: name.to_owned(),
                offset,
                c_type: c_type.to_owned(),
                size: 0,
            });
        }
    }
    match cur {
        Some(r) => Err(format!("dump ends inside record `{}`", r.name)),
        None => Ok(records),
    }
}

/// Fills in field sizes from the dump of the second probe.
pub fn apply_sizes(records: &mut [Record], size_dump: &[Record]) -> Result<(), String> {
    let by_name: BTreeMap<&str, &Record> = size_dump.iter().map(|r| (r.name.as_str(), r)).collect();
    for r in records {
        let probe_name = format!("{SIZE_PREFIX}{}", r.name);
        let probe = by_name
            .get(probe_name.as_str())
            .ok_or_else(|| format!("the size probe has no struct {probe_name}"))?;
        if probe.fields.len() != r.fields.len() {
            return Err(format!(
                "struct {probe_name} has {} fields, struct {} has {}",
                probe.fields.len(),
                r.name,
                r.fields.len()
            ));
        }
        for (f, p) in r.fields.iter_mut().zip(&probe.fields) {
            let len = p
                .c_type
                .strip_prefix("char[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
                .filter(|_| p.name == f.name)
                .ok_or_else(|| {
                    format!(
                        "struct {probe_name}: expected `char[N] {}`, got `{} {}`",
                        f.name, p.c_type, p.name
                    )
                })?;
            f.size = len;
        }
    }
    Ok(())
}

/// Rust source: one `CLayout` constant per record, named after it in upper case.
///
/// The messages are written here, with the C numbers in them, because a failing constant
/// check can only print a string it was given whole.
pub fn generate(records: &[Record]) -> String {
    let mut s = String::from("// Generated by build.rs from bpf/sigil.h; do not edit.\n\n");
    for r in records {
        let layout = describe(r);
        let _ = writeln!(s, "/// `struct {}`: {layout}.", r.name);
        let _ = writeln!(
            s,
            "pub(crate) const {}: CLayout = CLayout {{",
            r.name.to_uppercase()
        );
        let _ = writeln!(s, "    size: {},", r.size);
        let _ = writeln!(s, "    align: {},", r.align);
        let head = format!("bpf/sigil.h struct {} ({layout})", r.name);
        let msgs = [
            ("size_msg", "has another size than its Rust mirror"),
            ("align_msg", "has another alignment than its Rust mirror"),
            (
                "unmirrored_msg",
                "has fields its Rust mirror does not name, or the mirror has fields C lacks",
            ),
            (
                "padding_msg",
                "has implicit padding: name every byte (`pad` fields), so no key or event carries uninitialised bytes",
            ),
            (
                "lpm_msg",
                "is an LPM trie key but does not start with `__u32 prefixlen`",
            ),
        ];
        for (field, what) in msgs {
            let _ = writeln!(s, "    {field}: {:?},", format!("{head} {what}"));
        }
        let _ = writeln!(s, "    fields: &[");
        for f in &r.fields {
            let _ = writeln!(
                s,
                "        CField {{ name: {:?}, offset: {}, size: {}, msg: {:?} }},",
                f.name,
                f.offset,
                f.size,
                format!(
                    "bpf/sigil.h struct {} field `{} {}` is at offset {}, {} bytes: its Rust mirror differs",
                    r.name, f.c_type, f.name, f.offset, f.size
                )
            );
        }
        let _ = writeln!(s, "    ],\n}};\n");
    }
    s
}

/// `#define NAME VALUE` lines of a header whose value is one integer literal (decimal or
/// hex): the numbers the programs and the Rust side must agree on.
pub fn int_defines(header: &str) -> Vec<(String, u64)> {
    header
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("#define ")?.split_whitespace();
            let name = words.next()?;
            let value = words.next()?;
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None; // a function-like macro
            }
            if !matches!(words.next(), None | Some("/*")) {
                return None; // an expression, not a literal
            }
            let value = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok()?,
                None => value.parse().ok()?,
            };
            Some((name.to_owned(), value))
        })
        .collect()
}

/// Rust source: one `u64` constant per integer `#define`.
pub fn generate_defines(defines: &[(String, u64)]) -> String {
    let mut s = String::from("// Generated by build.rs from bpf/sigil.h; do not edit.\n\n");
    for (name, value) in defines {
        let _ = writeln!(s, "pub(crate) const {name}: u64 = {value};");
    }
    s
}

fn describe(r: &Record) -> String {
    let fields: Vec<String> = r
        .fields
        .iter()
        .map(|f| format!("{}@{}+{}", f.name, f.offset, f.size))
        .collect();
    format!("{} bytes, align {}: {}", r.size, r.align, fields.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "
*** Dumping AST Record Layout
         0 | struct inner
         0 |   int x
           | [sizeof=4, align=4]

*** Dumping AST Record Layout
         0 | struct outer
         0 |   __u32 a
         4 |   struct inner in
         4 |     int x
         8 |   __u8[16] addr
           | [sizeof=24, align=4]
";

    #[test]
    fn parses_top_level_fields_and_skips_nested_ones() {
        let r = parse_dump(DUMP).expect("parse");
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[1].name.as_str(), r[1].size, r[1].align),
            ("outer", 24, 4)
        );
        let fields: Vec<(&str, usize, &str)> = r[1]
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.offset, f.c_type.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("a", 0, "__u32"),
                ("in", 4, "struct inner"),
                ("addr", 8, "__u8[16]")
            ]
        );
    }

    #[test]
    fn refuses_bit_fields_and_truncated_dumps() {
        let bits = "*** Dumping AST Record Layout\n 0 | struct b\n 0:0-3 |   __u8 x\n | [sizeof=1, align=1]\n";
        let e = parse_dump(bits).expect_err("bit-field");
        assert!(e.contains("bit-field"), "{e}");
        let cut = &DUMP[..DUMP.find("8 |   __u8[16]").expect("line")];
        let e = parse_dump(cut).expect_err("truncated");
        assert!(e.contains("outer"), "{e}");
    }

    #[test]
    fn sizes_come_from_the_probe_and_must_line_up() {
        let mut r = parse_dump(DUMP).expect("parse");
        let probe = size_probe("sigil.h", &r);
        assert!(
            probe.contains("char addr[sizeof(((struct outer *)0)->addr)];"),
            "{probe}"
        );
        let sizes = "
*** Dumping AST Record Layout
         0 | struct sigil_abi_sizes_inner
         0 |   char[4] x
           | [sizeof=4, align=1]

*** Dumping AST Record Layout
         0 | struct sigil_abi_sizes_outer
         0 |   char[4] a
         4 |   char[4] in
         8 |   char[16] addr
           | [sizeof=24, align=1]
";
        apply_sizes(&mut r, &parse_dump(sizes).expect("parse")).expect("apply");
        assert_eq!(r[1].fields[2].size, 16);
        let src = generate(&r);
        assert!(src.contains("pub(crate) const OUTER: CLayout"), "{src}");
        assert!(
            src.contains("CField { name: \"addr\", offset: 8, size: 16"),
            "{src}"
        );

        // A probe whose fields do not match the record is an error, not a silent zero.
        let wrong = sizes.replace("char[16] addr", "char[16] other");
        let e = apply_sizes(&mut r, &parse_dump(&wrong).expect("parse")).expect_err("names");
        assert!(e.contains("addr"), "{e}");
    }

    #[test]
    fn integer_defines_are_read_and_the_rest_skipped() {
        let h = "#define A 133 /* why */\n#define B 0x86DD\n#define C(x) x\n#define D 1 << 20\n\
                 #define E\n#define F G\n  #define H 1\n";
        let d = int_defines(h);
        assert_eq!(d, [("A".to_owned(), 133), ("B".to_owned(), 0x86dd)]);
        assert!(generate_defines(&d).contains("pub(crate) const B: u64 = 34525;"));
    }

    #[test]
    fn struct_names_are_the_definitions_at_column_zero() {
        let h = "struct a {\n\tint x;\n};\nstruct b;\n  struct c {\nstruct d {\n";
        assert_eq!(struct_names(h), ["a", "d"]);
        let probe = layout_probe("/x/sigil.h", &struct_names(h));
        assert!(probe.starts_with("#include \"/x/sigil.h\"\n"), "{probe}");
        assert!(probe.contains("= sizeof(struct d);"), "{probe}");
    }
}
