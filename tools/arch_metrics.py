"""Architecture metrics of the package: import cycles, upward imports, module and function sizes, lines shipped.

    python tools/arch_metrics.py [--root .]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

# layer of each top-level part of the package: imports must point to the same or a lower layer
# (core lowest; the options and file formats; the per-run machinery; the integrations; the report; demo and CLI)
LAYERS = [("gradclip_hf.core", 0),
          ("gradclip_hf.spikefile", 1), ("gradclip_hf.spikeruns", 1), ("gradclip_hf.options", 1),
          ("gradclip_hf.config", 2), ("gradclip_hf._config_checks", 2), ("gradclip_hf.reference", 2),
          ("gradclip_hf.run", 3),
          ("gradclip_hf.integrations", 4), ("gradclip_hf.standins", 4),
          ("gradclip_hf.report", 5), ("gradclip_hf.charts", 5),
          ("gradclip_hf.demo", 6),
          ("gradclip_hf.cli", 7), ("gradclip_hf.__main__", 7), ("gradclip_hf", 2)]


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return 1


def modules(root: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(root, "gradclip_hf")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(module: str, path: str, known: set[str], top_level_only: bool) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # TYPE_CHECKING blocks do not run
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def functions(path: str) -> list[tuple[str, int]]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.end_lineno - node.lineno + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    mods = modules(args.root)
    known = set(mods)
    top = {m: imports(m, p, known, True) for m, p in mods.items()}
    full = {m: imports(m, p, known, False) for m, p in mods.items()}
    # a package importing its own submodules (re-exports) is not a cycle of design; children importing the parent
    # package's __init__ names is
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in top.items()}
    print("import cycles (module-level imports):", cycles(graph) or "none")
    graph_full = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in full.items()}
    print("import cycles (any import, incl. in functions):", cycles(graph_full) or "none")
    up = sorted((m, d) for m, deps in full.items() for d in deps if layer(d) > layer(m) and not d.startswith(m + "."))
    print(f"imports from a lower layer up: {len(up)}")
    for m, d in up:
        print(f"  {m} -> {d}")
    sizes = sorted(((sum(1 for _ in open(p, encoding='utf-8')), m) for m, p in mods.items()), reverse=True)
    print(f"modules: {len(sizes)}; over 400 lines: {[(m, n) for n, m in sizes if n > 400] or 'none'}")
    print("largest modules:", ", ".join(f"{m} {n}" for n, m in sizes[:6]))
    long = sorted(((n, f"{m}.{f}") for m, p in mods.items() for f, n in functions(p) if n > 50), reverse=True)
    print(f"functions over 50 lines: {len(long)}", [(f, n) for n, f in long])
    shipped = sum(n for n, _ in sizes)
    repo = 0
    for folder, dirs, files in os.walk(args.root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "wandb", "runs")]
        repo += sum(sum(1 for _ in open(os.path.join(folder, f), encoding="utf-8", errors="replace"))
                    for f in files if f.endswith(".py"))
    print(f"python lines in the package (the wheel): {shipped}; in the repository: {repo}")


if __name__ == "__main__":
    main()
