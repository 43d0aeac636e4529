"""Choosing the modules to modify on a web page: OpenDelta's `interactive_modify`.

`select_modules(model, port)` serves a page at http://127.0.0.1:<port>/ with the model's module
tree, folded as `Visualization.structure_graph()` folds it (`0-11(BertLayer)`,
`query,key,value(Linear)`), a checkbox on every module, and Submit. Ticking a module inside a
folded branch ticks it in every branch that fold stands for; a folded branch unfolds into its
members with the button beside it. Submit returns the full names of the ticked modules, which
become the delta model's `modified_modules`, so a saved config holds them, not the question.

The page is served on the loopback interface only (OpenDelta served every interface, which
showed the model's structure to the network): on a remote machine, forward the port
(`ssh -L 8888:localhost:8888 host`). The server is Python's own `http.server`; the page has no
dependency and loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from torch import nn

# OpenDelta's port when `interactive_modify=True`.
DEFAULT_PORT = 8888


def module_tree(model: nn.Module) -> list[dict]:
    """The page's tree: the model's children as nodes {"names": [member names], "label"
    ("0-11"), "class", "parameters": ["weight:[768, 768]", ...], "children": [...]}, identical
    siblings folded into one node whose "names" lists them all; names are relative to the
    parent."""
    from fastdelta.visualization import _Describer

    root = _Describer(set(), {}, keep_non_params=False, only_common=False).describe(
        model, "", "", (), is_delta=False
    )
    return _groups(root)


def _groups(node) -> list[dict]:
    from fastdelta.visualization import _fold_names

    groups: dict[int, list] = {}
    for child in node.children:
        groups.setdefault(child.signature, []).append(child)
    return [
        {
            "names": [member.label for member in members],
            "label": _fold_names([member.label for member in members]),
            "class": members[0].module_class.__name__,
            "parameters": [f"{name}:{list(shape)}" for name, shape, _ in members[0].parameters],
            "children": _groups(members[0]),
        }
        for members in groups.values()
    ]


def page(model: nn.Module) -> str:
    """The HTML page that shows `model`'s tree and posts the ticked names to /submit."""
    title = html.escape(type(model).__name__)
    tree = json.dumps(module_tree(model)).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", title).replace("__TREE__", tree)


def select_modules(
    model: nn.Module,
    port: int = DEFAULT_PORT,
    announce: Callable[[str], None] | None = None,
) -> list[str]:
    """Serve the page on 127.0.0.1:`port` (0: any free port), tell `announce` (by default
    print) its address, and return the names submitted on it, in the model's order. Ctrl-C
    stops waiting; Cancel on the page raises a RuntimeError."""
    names = [name for name, _ in model.named_modules() if name]
    outcome: dict[str, object] = {}
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(page(model), set(names), outcome))
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    (announce or print)(
        f"Choose the modules to modify on {url} (on a remote machine, forward the port: "
        f"ssh -L {server.server_address[1]}:localhost:{server.server_address[1]} <host>)"
    )
    with server:
        server.serve_forever(poll_interval=0.1)
    if "cancelled" in outcome:
        raise RuntimeError("interactive_modify: the selection was cancelled on the page")
    chosen = set(outcome["modules"])
    return [name for name in names if name in chosen]


def _handler(body: str, known: set[str], outcome: dict) -> type[BaseHTTPRequestHandler]:
    """The request handler of one selection: GET / serves the page; POST /submit takes
    {"modules": [names]}, POST /cancel gives up; either ends the server."""
    page_bytes = body.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in ("/", "/index.html"):
                self._reply(HTTPStatus.NOT_FOUND, "not found")
                return
            self._reply(HTTPStatus.OK, page_bytes, "text/html; charset=utf-8")

        def do_POST(self):
            if self.path == "/cancel":
                outcome["cancelled"] = True
                self._reply(HTTPStatus.OK, "cancelled")
                self._finish()
                return
            if self.path != "/submit":
                self._reply(HTTPStatus.NOT_FOUND, "not found")
                return
            length = int(self.headers.get("Content-Length", 0))
            try:
                modules = json.loads(self.rfile.read(length))["modules"]
            except (ValueError, KeyError, TypeError):
                self._reply(HTTPStatus.BAD_REQUEST, 'send {"modules": [names]}')
                return
            problem = _selection_problem(modules, known)
            if problem:
                self._reply(HTTPStatus.BAD_REQUEST, problem)
                return
            outcome["modules"] = modules
            self._reply(HTTPStatus.OK, f"{len(modules)} modules chosen; this page can close")
            self._finish()

        def _reply(self, status, body, content_type="text/plain; charset=utf-8"):
            data = body if isinstance(body, bytes) else body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _finish(self):
            # shutdown() waits for serve_forever to return: from another thread than this one.
            threading.Thread(target=self.server.shutdown, daemon=True).start()

        def log_message(self, format, *args):
            """Quiet: the terminal shows the address and the result, not each request."""

    return Handler


def _selection_problem(modules, known: set[str]) -> str | None:
    """Why a submitted selection cannot be used (None when it can)."""
    if not isinstance(modules, list) or not all(isinstance(name, str) for name in modules):
        return "modules must be a list of module names"
    if not modules:
        return "choose at least one module"
    unknown = sorted(set(modules) - known)
    if unknown:
        return f"not modules of this model: {', '.join(unknown[:5])}"
    return None


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fastdelta: choose the modules of __TITLE__</title>
<style>
body { font-family: monospace; margin: 1.5em; }
ul { list-style: none; padding-left: 1.6em; margin: 0; }
li > div { white-space: nowrap; }
.class { color: #888; }
.parameters { color: #2a7; margin-left: 0.6em; }
button.toggle, button.unfold { font-family: monospace; padding: 0 0.3em; margin-right: 0.3em; }
.collapsed > ul { display: none; }
#status { margin-top: 1em; }
</style>
</head>
<body>
<h3>Tick the modules of __TITLE__ that get a delta, then Submit</h3>
<p>Ticking a module in a folded branch (<code>0-11</code>) ticks it in every member;
[*] unfolds a branch into its members.</p>
<ul id="tree"></ul>
<p>
<button id="submit" disabled>Submit</button>
<button id="cancel">Cancel</button>
<span id="count">0 modules ticked</span>
</p>
<div id="status"></div>
<script>
const TREE = __TREE__;

function fullNames(prefixes, names) {
  const result = [];
  for (const prefix of prefixes) {
    for (const name of names) result.push(prefix ? prefix + "." + name : name);
  }
  return result;
}

function renderNode(node, prefixes, names) {
  const item = document.createElement("li");
  const line = document.createElement("div");
  const paths = fullNames(prefixes, names);
  if (node.children.length) {
    const toggle = document.createElement("button");
    toggle.className = "toggle";
    toggle.textContent = "-";
    toggle.onclick = () => {
      item.classList.toggle("collapsed");
      toggle.textContent = item.classList.contains("collapsed") ? "+" : "-";
    };
    line.appendChild(toggle);
  }
  const box = document.createElement("input");
  box.type = "checkbox";
  box.dataset.paths = JSON.stringify(paths);
  box.id = "module:" + paths.join("|");
  box.onchange = updateCount;
  const label = document.createElement("label");
  label.htmlFor = box.id;
  label.textContent = names.length === node.names.length ? node.label : names.join(",");
  const kind = document.createElement("span");
  kind.className = "class";
  kind.textContent = "(" + node.class + ")";
  label.appendChild(kind);
  if (node.parameters.length) {
    const parameters = document.createElement("span");
    parameters.className = "parameters";
    parameters.textContent = node.parameters.join(" ");
    label.appendChild(parameters);
  }
  line.appendChild(box);
  line.appendChild(label);
  if (names.length > 1) {
    const unfold = document.createElement("button");
    unfold.className = "unfold";
    unfold.textContent = "[*]";
    unfold.title = "unfold into its members";
    unfold.onclick = () => {
      // What was ticked in the folded branch stays ticked in each member.
      const ticked = new Set();
      for (const box of item.querySelectorAll("input:checked")) {
        for (const name of JSON.parse(box.dataset.paths)) ticked.add(name);
      }
      const members = names.map((name) => renderNode(node, prefixes, [name]));
      for (const member of members) {
        for (const box of member.querySelectorAll("input")) {
          box.checked = JSON.parse(box.dataset.paths).every((name) => ticked.has(name));
        }
      }
      item.replaceWith(...members);
      updateCount();
    };
    line.appendChild(unfold);
  }
  item.appendChild(line);
  const list = document.createElement("ul");
  for (const child of node.children) list.appendChild(renderNode(child, paths, child.names));
  item.appendChild(list);
  return item;
}

function chosen() {
  const names = [];
  for (const box of document.querySelectorAll("#tree input:checked")) {
    for (const name of JSON.parse(box.dataset.paths)) {
      if (!names.includes(name)) names.push(name);
    }
  }
  return names;
}

function updateCount() {
  const count = chosen().length;
  document.getElementById("count").textContent = count + " modules ticked";
  document.getElementById("submit").disabled = count === 0;
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", body: JSON.stringify(body)});
  document.getElementById("status").textContent = await response.text();
  if (response.ok) {
    for (const button of document.querySelectorAll("button")) button.disabled = true;
  }
}

const tree = document.getElementById("tree");
for (const node of TREE) tree.appendChild(renderNode(node, [""], node.names));
document.getElementById("submit").onclick = () => post("/submit", {modules: chosen()});
document.getElementById("cancel").onclick = () => post("/cancel", {});
</script>
</body>
</html>
"""
