"""`merge-lab methods`: every merge method with its parameters and defaults."""

from __future__ import annotations

import json

import merge_lab_methods


def add_parser(sub):
    p = sub.add_parser("methods", help="list the merge methods, their parameters and defaults")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    M = merge_lab_methods
    rows = []
    for name in M.method_names():
        m = M.get_method(name)
        rows.append({
            "name": name,
            "summary": m.summary,
            "base": m.base,
            "models": f"{m.min_models}+" if m.max_models is None else
                      (str(m.min_models) if m.min_models == m.max_models else f"{m.min_models}-{m.max_models}"),
            "randomized": m.randomized,
            "default_alpha": m.default_ratio,
            "params": [{"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help,
                        **({"choices": list(p.choices)} if p.choices else {})} for p in m.params],
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        base = {"required": ", needs --base", "optional": ", --base optional", "never": ""}[r["base"]]
        noun = "model" if r["models"] == "1" else "models"
        print(f"{r['name']}  ({r['models']} {noun}{base}{', seeded' if r['randomized'] else ''})")
        print(f"    {r['summary']}")
        print(f"    --alpha {r['default_alpha']:g} by default")
        for p in r["params"]:
            choices = f" [{'|'.join(map(str, p['choices']))}]" if "choices" in p else ""
            print(f"    --param {p['name']}={p['default']}{choices}  {p['help']}")
    return 0
