#!/usr/bin/env python3
"""Generate `src/methods.rs` from the AMQP 0-9-1 spec (RabbitMQ's JSON edition).

Why a generator: the protocol has 8 classes and 60-odd methods whose field
layouts are pure data. Writing them by hand invites typos in bit packing and
field order; generating them from the spec keeps the Rust types and the wire
layout provably in step. The output is committed so that readers and reviewers
see real code, and `.ci/run` runs `generate.py --check` so it cannot drift.

It also writes `tests/common/methods.rs`: a proptest strategy producing any
method with arbitrary field values, so the round-trip property covers every
method the spec defines.

Usage:
    python3 crates/amqp-codec/codegen/generate.py          # rewrite both files
    python3 crates/amqp-codec/codegen/generate.py --check  # exit 1 if out of date

The output is passed through `rustfmt` so that `cargo fmt --check` stays clean.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

CRATE = pathlib.Path(__file__).resolve().parent.parent
SPEC = CRATE / "spec" / "amqp-rabbitmq-0.9.1.json"
OUT = CRATE / "src" / "methods.rs"
STRATEGIES = CRATE / "tests" / "common" / "methods.rs"

RUST_TYPES = {
    "bit": "bool",
    "octet": "u8",
    "short": "u16",
    "long": "u32",
    "longlong": "u64",
    "timestamp": "u64",
    "shortstr": "ShortStr",
    "longstr": "Bytes",
    "table": "FieldTable",
}

KEYWORDS = {"type": "kind"}


def camel(name):
    return "".join(part.capitalize() for part in name.split("-"))


def snake(name):
    s = name.replace("-", "_")
    return KEYWORDS.get(s, s)


def upper(name):
    return name.replace("-", "_").upper()


def is_frame_constant(c):
    # Frame types and limits have no error class; reply codes do (except 200).
    return "class" not in c and c["name"] != "REPLY-SUCCESS"


def field_type(arg, domains):
    if "type" in arg:
        return arg["type"]
    return domains[arg["domain"]]


def gen_struct(cls, m, domains, out):
    struct = camel(cls["name"]) + camel(m["name"])
    name = f'{cls["name"]}.{m["name"]}'
    args = [(snake(a["name"]), field_type(a, domains), a["name"]) for a in m["arguments"]]
    sync = "true" if m.get("synchronous") else "false"
    content = "true" if m.get("content") else "false"

    out.append(f"/// `{name}` (class {cls['id']}, method {m['id']}).")
    out.append("#[derive(Debug, Clone, PartialEq, Default)]")
    out.append(f"pub struct {struct} {{")
    for field, ty, wire in args:
        out.append(f"    /// `{wire}` ({ty})")
        out.append(f"    pub {field}: {RUST_TYPES[ty]},")
    out.append("}")
    out.append("")
    out.append(f"impl {struct} {{")
    out.append(f"    /// AMQP class id.\n    pub const CLASS_ID: u16 = {cls['id']};")
    out.append(f"    /// AMQP method id.\n    pub const METHOD_ID: u16 = {m['id']};")
    out.append(f'    /// `class.method` name as the spec spells it.\n    pub const NAME: &\'static str = "{name}";')
    out.append(f"    /// Whether the peer must answer this method with its `-ok` reply.\n    pub const SYNCHRONOUS: bool = {sync};")
    out.append(f"    /// Whether a content header and body follow this method.\n    pub const HAS_CONTENT: bool = {content};")
    out.append("")

    # decode
    src_used = any(ty in ("shortstr", "longstr", "table") for _, ty, _ in args)
    src = "src" if src_used else "_src"
    i_used = bool(args)
    inp = "i" if i_used else "i"
    out.append(f"    fn decode_fields<'a>({src}: &Bytes, {inp}: &'a [u8]) -> PResult<'a, Self> {{")
    bit_index = None
    for field, ty, _ in args:
        if ty == "bit":
            if bit_index is None or bit_index == 8:
                out.append("        let (i, bits) = be_u8(i)?;")
                bit_index = 0
            out.append(f"        let {field} = bits & (1 << {bit_index}) != 0;")
            bit_index += 1
            continue
        bit_index = None
        if ty == "octet":
            out.append(f"        let (i, {field}) = be_u8(i)?;")
        elif ty == "short":
            out.append(f"        let (i, {field}) = be_u16(i)?;")
        elif ty == "long":
            out.append(f"        let (i, {field}) = be_u32(i)?;")
        elif ty in ("longlong", "timestamp"):
            out.append(f"        let (i, {field}) = be_u64(i)?;")
        elif ty == "shortstr":
            out.append(f"        let (i, {field}) = short_str(src, i)?;")
        elif ty == "longstr":
            out.append(f"        let (i, {field}) = long_str(src, i)?;")
        elif ty == "table":
            out.append(f"        let (i, {field}) = field_table(src, i, 0)?;")
        else:
            raise SystemExit(f"unknown type {ty}")
    fields = ", ".join(f for f, _, _ in args)
    if args:
        out.append(f"        Ok((i, Self {{ {fields} }}))")
    else:
        out.append("        Ok((i, Self {}))")
    out.append("    }")
    out.append("")

    # encode
    buf = "buf" if args else "_buf"
    out.append(f"    fn encode_fields(&self, {buf}: &mut BytesMut) -> Result<(), CodecError> {{")
    pending_bits = []

    def flush_bits():
        if not pending_bits:
            return
        out.append("        let mut bits = 0u8;")
        for idx, f in enumerate(pending_bits):
            out.append(f"        if self.{f} {{ bits |= 1 << {idx}; }}")
        out.append("        buf.put_u8(bits);")
        pending_bits.clear()

    for field, ty, _ in args:
        if ty == "bit":
            if len(pending_bits) == 8:
                flush_bits()
            pending_bits.append(field)
            continue
        flush_bits()
        if ty == "octet":
            out.append(f"        buf.put_u8(self.{field});")
        elif ty == "short":
            out.append(f"        buf.put_u16(self.{field});")
        elif ty == "long":
            out.append(f"        buf.put_u32(self.{field});")
        elif ty in ("longlong", "timestamp"):
            out.append(f"        buf.put_u64(self.{field});")
        elif ty == "shortstr":
            out.append(f"        put_short_str(buf, &self.{field});")
        elif ty == "longstr":
            out.append(f"        put_long_str(buf, &self.{field})?;")
        elif ty == "table":
            out.append(f"        self.{field}.encode(buf)?;")
    flush_bits()
    out.append("        Ok(())")
    out.append("    }")
    out.append("}")
    out.append("")
    out.append(f"impl From<{struct}> for Method {{")
    out.append(f"    fn from(m: {struct}) -> Self {{ Method::{struct}(m) }}")
    out.append("}")
    out.append("")
    return struct


def main():
    spec = json.loads(SPEC.read_text())
    domains = {name: ty for name, ty in spec["domains"]}
    out = []
    out.append("// @generated by codegen/generate.py from spec/amqp-rabbitmq-0.9.1.json. Do not edit by hand:")
    out.append("// change the generator and run `python3 crates/amqp-codec/codegen/generate.py`.")
    out.append("")
    out.append("//! Every method of AMQP 0-9-1 with RabbitMQ's extensions, as typed structs, the [`Method`] enum")
    out.append("//! over all of them, and the protocol's constants (class ids, frame types, reply codes).")
    out.append("")
    out.append("use bytes::{BufMut, Bytes, BytesMut};")
    out.append("use nom::number::complete::{be_u8, be_u16, be_u32, be_u64};")
    out.append("")
    out.append("use crate::error::CodecError;")
    out.append("use crate::primitives::{PResult, long_str, put_long_str, put_short_str, short_str};")
    out.append("use crate::table::{FieldTable, field_table};")
    out.append("use crate::types::ShortStr;")
    out.append("")

    out.append("/// Class ids.")
    out.append("pub mod class_id {")
    for cls in spec["classes"]:
        out.append(f"    /// `{cls['name']}`")
        out.append(f"    pub const {upper(cls['name'])}: u16 = {cls['id']};")
    out.append("}")
    out.append("")

    out.append("/// Frame types, frame limits and the frame-end octet.")
    out.append("pub mod frame_constant {")
    for c in spec["constants"]:
        if is_frame_constant(c):
            ty = "u32" if c["name"] == "FRAME-MIN-SIZE" else "u8"
            out.append(f"    /// `{c['name']}`")
            out.append(f"    pub const {upper(c['name'][6:])}: {ty} = {c['value']};")
    out.append("}")
    out.append("")

    out.append("/// Reply codes for `connection.close`, `channel.close` and `basic.return`.")
    out.append("pub mod reply_code {")
    for c in spec["constants"]:
        if not is_frame_constant(c):
            kind = c.get("class")
            doc = f"`{c['name']}`" + (f" ({kind}: closes the {'channel' if kind == 'soft-error' else 'connection'})" if kind else "")
            out.append(f"    /// {doc}")
            out.append(f"    pub const {upper(c['name'])}: u16 = {c['value']};")
    out.append("}")
    out.append("")

    variants = []
    for cls in spec["classes"]:
        for m in cls["methods"]:
            variants.append((cls, m, gen_struct(cls, m, domains, out)))

    out.append("/// One decoded method of any class.")
    out.append("#[derive(Debug, Clone, PartialEq)]")
    out.append("pub enum Method {")
    for cls, m, v in variants:
        out.append(f"    /// `{cls['name']}.{m['name']}`")
        out.append(f"    {v}({v}),")
    out.append("}")
    out.append("")
    out.append("impl Method {")
    for fn, const, ty in [
        ("class_id", "CLASS_ID", "u16"),
        ("method_id", "METHOD_ID", "u16"),
        ("name", "NAME", "&'static str"),
        ("is_synchronous", "SYNCHRONOUS", "bool"),
        ("has_content", "HAS_CONTENT", "bool"),
    ]:
        doc = {
            "class_id": "The AMQP class id.",
            "method_id": "The AMQP method id within its class.",
            "name": "`class.method`, e.g. `basic.publish`.",
            "is_synchronous": "Whether the spec requires the peer to reply (`-ok`).",
            "has_content": "Whether a content header and body frames follow.",
        }[fn]
        out.append(f"    /// {doc}")
        out.append(f"    pub fn {fn}(&self) -> {ty} {{")
        out.append("        match self {")
        for _, _, v in variants:
            out.append(f"            Method::{v}(_) => {v}::{const},")
        out.append("        }")
        out.append("    }")
        out.append("")
    out.append("    /// Decodes the fields of method `(class_id, method_id)` from `i`, a tail of `src`.")
    out.append("    /// Returns the unconsumed input, which the caller requires to be empty.")
    out.append("    pub(crate) fn decode_fields<'a>(class_id: u16, method_id: u16, src: &Bytes, i: &'a [u8]) -> Result<(&'a [u8], Method), CodecError> {")
    out.append("        match (class_id, method_id) {")
    for cls, m, v in variants:
        out.append(f"            ({cls['id']}, {m['id']}) => {v}::decode_fields(src, i)")
        out.append(f"                .map(|(rest, m)| (rest, Method::{v}(m)))")
        out.append(f"                .map_err(|e| CodecError::malformed_method({v}::NAME, e)),")
    out.append("            _ => Err(CodecError::UnknownMethod { class_id, method_id }),")
    out.append("        }")
    out.append("    }")
    out.append("")
    out.append("    /// Encodes the method's fields (not its class and method ids) into `buf`.")
    out.append("    pub(crate) fn encode_fields(&self, buf: &mut BytesMut) -> Result<(), CodecError> {")
    out.append("        match self {")
    for _, _, v in variants:
        out.append(f"            Method::{v}(m) => m.encode_fields(buf),")
    out.append("        }")
    out.append("    }")
    out.append("}")
    out.append("")
    out.append("/// The `class.method` name of a method id pair, if the protocol defines it.")
    out.append("pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {")
    out.append("    match (class_id, method_id) {")
    for cls, m, v in variants:
        out.append(f"        ({cls['id']}, {m['id']}) => Some({v}::NAME),")
    out.append("        _ => None,")
    out.append("    }")
    out.append("}")
    out.append("")

    emit(OUT, "\n".join(out) + "\n")
    emit(STRATEGIES, gen_strategies(spec, domains))


STRATEGY_FOR = {
    "bit": "any::<bool>()",
    "octet": "any::<u8>()",
    "short": "any::<u16>()",
    "long": "any::<u32>()",
    "longlong": "any::<u64>()",
    "timestamp": "any::<u64>()",
    "shortstr": "arb_short_str()",
    "longstr": "arb_long_str()",
    "table": "arb_table()",
}


def gen_strategies(spec, domains):
    out = [
        "// @generated by codegen/generate.py from spec/amqp-rabbitmq-0.9.1.json. Do not edit by hand.",
        "",
        "//! A proptest strategy for every method of the spec, with arbitrary field values.",
        "",
        "use amqp_codec::Method;",
        "use amqp_codec::methods::*;",
        "use proptest::prelude::*;",
        "",
        "use super::{arb_long_str, arb_short_str, arb_table};",
        "",
        "/// Any method, with arbitrary fields.",
        "pub(crate) fn arb_method() -> BoxedStrategy<Method> {",
        "    prop_oneof![",
    ]
    for cls in spec["classes"]:
        for m in cls["methods"]:
            struct = camel(cls["name"]) + camel(m["name"])
            args = [(snake(a["name"]), field_type(a, domains)) for a in m["arguments"]]
            if not args:
                out.append(f"        Just(Method::{struct}({struct} {{}})),")
                continue
            strategies = ", ".join(STRATEGY_FOR[ty] for _, ty in args)
            names = ", ".join(f for f, _ in args)
            out.append(f"        ({strategies},).prop_map(|({names},)| Method::{struct}({struct} {{ {names} }})),")
    out.append("    ]")
    out.append("    .boxed()")
    out.append("}")
    return "\n".join(out) + "\n"


def emit(path, text):
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp) / path.name
        tmp_path.write_text(text)
        subprocess.run(["rustfmt", "--edition", "2024", str(tmp_path)], check=True)
        text = tmp_path.read_text()
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run python3 crates/amqp-codec/codegen/generate.py", file=sys.stderr)
            sys.exit(1)
        print(f"{path.name} is up to date")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
