"""Parse `module.v4ir` text (see `printer`) back into a `Module` (without weight data)."""

import json
import re

from .module import Function, Instr, Module, ParamRef, Value
from .printer import IR_VERSION
from .types import IRTypeError, TensorType


class ParseError(ValueError):
    def __init__(self, line_no: int, col: int, message: str, line: str = ""):
        super().__init__(f"line {line_no}, column {col}: {message}" + (f"\n  {line.strip()}" if line else ""))


_TYPE = re.compile(r"\s*([a-z0-9]+)\[([^\]]*)\]")
_NAME = r"[A-Za-z0-9_.+\-]+"
_DECL = re.compile(rf"(param|state) @({_NAME}) : (.*)$")
_OPERAND = re.compile(rf"\s*([%@])({_NAME})\s*")
_JSON = json.JSONDecoder()


class _Cursor:
    def __init__(self, line_no: int, text: str):
        self.line_no, self.text, self.pos = line_no, text, 0

    def fail(self, message: str):
        raise ParseError(self.line_no, self.pos + 1, message, self.text)

    def skip_ws(self):
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def eat(self, token: str) -> bool:
        self.skip_ws()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def need(self, token: str):
        if not self.eat(token):
            self.fail(f"expected {token!r}")

    def match(self, pattern: re.Pattern):
        m = pattern.match(self.text, self.pos)
        if not m:
            self.fail(f"expected {pattern.pattern!r}")
        self.pos = m.end()
        return m

    def type(self) -> TensorType:
        m = self.match(_TYPE)
        dims = [d.strip() for d in m.group(2).split(",") if d.strip()]
        try:
            return TensorType(tuple(int(d) if d.isdigit() else d for d in dims), m.group(1))
        except IRTypeError as e:
            self.fail(str(e))

    def types(self) -> list[TensorType]:
        out = [self.type()]
        while self.eat(","):
            out.append(self.type())
        return out

    def done(self):
        self.skip_ws()
        if self.pos != len(self.text):
            self.fail("unexpected text")


def _parse_instr(c: _Cursor, values: dict) -> Instr:
    results = []
    if c.text.lstrip().startswith("%"):
        results.append(c.match(_OPERAND).group(2))
        while c.eat(","):
            results.append(c.match(_OPERAND).group(2))
        c.need("=")
    c.skip_ws()
    op = c.match(re.compile(r"[a-z_0-9]+")).group(0)
    c.need("(")
    operands = []
    while not c.eat(")"):
        if operands:
            c.need(",")
        sigil, name = c.match(_OPERAND).groups()
        if sigil == "@":
            operands.append(ParamRef(name))
        elif name not in values:
            c.fail(f"%{name} is used before it is defined")
        else:
            operands.append(values[name])
    attrs, state = {}, []
    c.skip_ws()
    if c.text.startswith("{", c.pos):
        try:
            attrs, c.pos = _JSON.raw_decode(c.text, c.pos)
        except json.JSONDecodeError as e:
            c.fail(f"bad attributes: {e.msg}")
    if c.eat("state("):
        while not c.eat(")"):
            if state:
                c.need(",")
            state.append(c.match(re.compile(rf"\s*@({_NAME})\s*")).group(1))
    types = []
    if results:
        c.need(":")
        types = c.types()
        if len(types) != len(results):
            c.fail(f"{len(results)} results but {len(types)} types")
    c.done()
    return Instr(op, operands, [Value(n, t) for n, t in zip(results, types)], attrs, state)


def parse_module(text: str) -> Module:
    lines = text.splitlines()
    header = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not header or header[0][1].strip() != f"v4ir {IR_VERSION}":
        raise ParseError(1, 1, f"not a v4ir {IR_VERSION} module (first line must be 'v4ir {IR_VERSION}')")
    it = iter(header[1:])
    line_no, line = next(it, (2, ""))
    m = re.fullmatch(rf"module @({_NAME}) max_context=(\d+)", line.strip())
    if not m:
        raise ParseError(line_no, 1, "expected 'module @NAME max_context=N'", line)
    name, max_context = m.group(1), int(m.group(2))
    line_no, line = next(it, (line_no + 1, ""))
    if not line.startswith("config "):
        raise ParseError(line_no, 1, "expected 'config {json}'", line)
    try:
        config = json.loads(line[len("config "):])
    except json.JSONDecodeError as e:
        raise ParseError(line_no, e.colno + 7, f"bad config JSON: {e.msg}", line) from None
    params, states = {}, {}
    for line_no, line in it:
        decl = _DECL.fullmatch(line.strip())
        if not decl:
            break
        c = _Cursor(line_no, decl.group(3))
        table = params if decl.group(1) == "param" else states
        if decl.group(2) in table:
            raise ParseError(line_no, 1, f"{decl.group(1)} @{decl.group(2)} declared twice", line)
        table[decl.group(2)] = c.type()
        c.done()
    else:
        raise ParseError(len(lines), 1, "missing 'func (...) {'")
    c = _Cursor(line_no, line.strip())
    c.need("func (")
    inputs = []
    while not c.eat(")"):
        if inputs:
            c.need(",")
        vname = c.match(_OPERAND).group(2)
        c.need(":")
        inputs.append(Value(vname, c.type()))
    c.need("{")
    c.done()
    values = {v.name: v for v in inputs}
    body, output = [], None
    for line_no, line in it:
        stripped = line.strip()
        if stripped.startswith("return "):
            out_name = stripped[len("return "):].strip().lstrip("%")
            if out_name not in values:
                raise ParseError(line_no, 1, f"returns undefined %{out_name}", line)
            output = values[out_name]
            break
        ins = _parse_instr(_Cursor(line_no, stripped), values)
        for r in ins.results:
            if r.name in values:
                raise ParseError(line_no, 1, f"%{r.name} is defined twice", line)
            values[r.name] = r
        body.append(ins)
    if output is None:
        raise ParseError(len(lines), 1, "missing 'return %value'")
    rest = [(n, ln.strip()) for n, ln in it]
    if [ln for _, ln in rest] != ["}"]:
        raise ParseError(rest[-1][0] if rest else line_no, 1, "expected a single '}' after return")
    return Module(name, config, params, states, Function(inputs, body, output), max_context)
