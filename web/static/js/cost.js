// The price of a template task before it is sent: the template's cost rule (numbers, parameter names,
// + - * /, unary -, parentheses, ceil, floor, min, max) evaluated over the form's values. Display only:
// the gateway prices the task itself. Anything it cannot read gives null.

const TOKEN = /\s*(\d+(?:\.\d+)?|[A-Za-z_]\w*|[()+\-*/,])/y;
const FUNCS = {
  ceil: (x) => Math.ceil(x - 1e-9), // float noise must not push a whole number up (ceil(0.1 * 30) is 3)
  floor: (x) => Math.floor(x + 1e-9),
  min: Math.min,
  max: Math.max,
};

function tokenize(text) {
  const out = [];
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < text.length) {
    if (/^\s*$/.test(text.slice(TOKEN.lastIndex))) break;
    const m = TOKEN.exec(text);
    if (!m) throw new Error("bad rule");
    out.push(m[1]);
  }
  return out;
}

export function costOf(rule, values) {
  try {
    const toks = tokenize(String(rule));
    let i = 0;
    const peek = () => toks[i];
    const take = (want) => {
      if (want !== undefined && toks[i] !== want) throw new Error("expected " + want);
      return toks[i++];
    };
    const primary = () => {
      const t = take();
      if (t === "(") { const v = expr(); take(")"); return v; }
      if (/^\d/.test(t)) return Number(t);
      if (peek() === "(" && t in FUNCS) {
        take("(");
        const args = [expr()];
        while (peek() === ",") { take(","); args.push(expr()); }
        take(")");
        return FUNCS[t](...args);
      }
      const v = values[t];
      if (typeof v === "boolean") return v ? 1 : 0;
      if (typeof v !== "number" || !Number.isFinite(v)) throw new Error("no value for " + t);
      return v;
    };
    const unary = () => (peek() === "-" ? (take(), -unary()) : primary());
    const term = () => {
      let v = unary();
      while (peek() === "*" || peek() === "/") v = take() === "*" ? v * unary() : v / unary();
      return v;
    };
    const expr = () => {
      let v = term();
      while (peek() === "+" || peek() === "-") v = take() === "+" ? v + term() : v - term();
      return v;
    };
    const v = expr();
    if (i !== toks.length || !Number.isFinite(v)) return null;
    return Math.round(v * 1e6) / 1e6;
  } catch (_) {
    return null;
  }
}
