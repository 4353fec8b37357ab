"""The native dialogs, in a child process: ``python -m slipstream.agent.tkdialog REQUEST``.

Tk wants its own main loop on the main thread, so the agent never imports it: it runs this
module with a JSON request and reads one JSON line back: ``{"paths": [...]}`` for the file
dialogs (empty when cancelled), ``{"text": ...}`` for a password, ``{"ok": bool}`` for a
confirmation.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _filetypes(filters: object) -> list[tuple[str, str]]:
    types: list[tuple[str, str]] = []
    if isinstance(filters, list):
        for item in filters:
            if isinstance(item, dict):
                exts = [str(e) for e in item.get("extensions") or ["*"]]
                pattern = " ".join("*" if e == "*" else f"*.{e.lstrip('.')}" for e in exts)
                types.append((str(item.get("filter_name") or pattern), pattern))
    return types + [("All files", "*")] if types else []


def _as_list(answer: Any) -> list[str]:
    if not answer:
        return []
    if isinstance(answer, str):
        return [answer]
    return [str(item) for item in answer]


def run(request: dict[str, Any]) -> dict[str, Any]:
    import tkinter
    from tkinter import filedialog, messagebox, simpledialog

    root = tkinter.Tk()
    root.withdraw()
    title = str(request.get("title") or "Slipstream")
    kind = request.get("kind")
    try:
        if kind == "open-file":
            options: dict[str, Any] = {"title": title, "parent": root}
            if _filetypes(request.get("filters")):
                options["filetypes"] = _filetypes(request.get("filters"))
            if request.get("multiple", True):
                return {"paths": _as_list(filedialog.askopenfilenames(**options))}
            return {"paths": _as_list(filedialog.askopenfilename(**options))}
        if kind == "open-folder":
            return {"paths": _as_list(filedialog.askdirectory(title=title, parent=root))}
        if kind == "save":
            name = str(request.get("suggested") or "")
            answer = filedialog.asksaveasfilename(title=title, initialfile=name, parent=root)
            return {"paths": _as_list(answer)}
        if kind == "password":
            text = simpledialog.askstring(title, str(request.get("prompt")), show="*", parent=root)
            return {"text": text}
        if kind == "confirm":
            return {"ok": bool(messagebox.askyesno(title, str(request.get("prompt")), parent=root))}
        return {"error": f"unknown dialog {kind!r}"}
    finally:
        root.destroy()


def main() -> None:
    request = json.loads(sys.argv[1])
    print(json.dumps(run(request)), flush=True)


if __name__ == "__main__":
    main()
