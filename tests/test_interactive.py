"""interactive_modify: the modules are chosen on a local page (fastdelta.interactive), over
HTTP and in a real headless browser."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.request

import pytest
from tiny_models import tiny_model

import fastdelta
from fastdelta import interactive

QUERY_NAMES = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Selection:
    """select_modules (or a delta model built with interactive_modify) run in a thread, with
    the page's address once it is served."""

    def __init__(self, run):
        self.ready = threading.Event()
        self.url = None
        self.result = None
        self.error = None

        def announce(message: str) -> None:
            self.url = message.split(" on ", 1)[1].split(" ", 1)[0]
            self.ready.set()

        def target():
            try:
                self.result = run(announce)
            except Exception as error:  # handed to the test thread by join()
                self.error = error
            self.ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the page was not served"

    def post(self, path: str, body) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"
        if self.error is not None:
            raise self.error
        return self.result


def test_the_tree_folds_identical_siblings_as_the_structure_graph_does():
    tree = interactive.module_tree(tiny_model("bert"))
    encoder = next(node for node in tree if node["names"] == ["encoder"])
    layers = encoder["children"][0]["children"][0]
    assert (layers["names"], layers["label"], layers["class"]) == (["0", "1"], "0-1", "BertLayer")
    attention = layers["children"][0]["children"][0]["children"][0]
    assert attention["names"] == ["query", "key", "value"]
    assert attention["parameters"] == ["weight:[36, 36]", "bias:[36]"]


def test_the_page_embeds_the_tree_as_data_not_markup():
    page = interactive.page(tiny_model("bert"))
    assert page.count("</script>") == 1
    assert '"names": ["0", "1"]' in page
    assert "<title>fastdelta: choose the modules of BertModel</title>" in page


def test_the_submitted_modules_come_back_in_the_models_order():
    model = tiny_model("bert")
    selection = Selection(lambda announce: interactive.select_modules(model, 0, announce))
    with urllib.request.urlopen(selection.url, timeout=30) as response:
        assert "choose the modules of BertModel" in response.read().decode()
    assert selection.post("submit", {"modules": ["nonsense"]}) == (
        400,
        "not modules of this model: nonsense",
    )
    assert selection.post("submit", {"modules": []}) == (400, "choose at least one module")
    assert selection.post("submit", {"names": []})[0] == 400
    status, text = selection.post("submit", {"modules": QUERY_NAMES[::-1]})
    assert (status, text) == (200, "2 modules chosen; this page can close")
    assert selection.join() == QUERY_NAMES


def test_cancel_on_the_page_raises():
    selection = Selection(
        lambda announce: interactive.select_modules(tiny_model("bert"), 0, announce)
    )
    assert selection.post("cancel", {})[0] == 200
    with pytest.raises(RuntimeError, match="cancelled"):
        selection.join()


def test_a_delta_model_built_interactively_modifies_the_chosen_modules(monkeypatch):
    port = free_port()
    messages = []

    def build(announce):
        monkeypatch.setattr(
            "builtins.print", lambda message: (messages.append(message), announce(message))
        )
        return fastdelta.LoraModel(tiny_model("bert"), interactive_modify=port)

    selection = Selection(build)
    assert selection.url == f"http://127.0.0.1:{port}/"
    assert f"ssh -L {port}:localhost:{port}" in messages[0]
    assert selection.post("submit", {"modules": QUERY_NAMES})[0] == 200
    delta_model = selection.join()
    assert [attachment.host_name for attachment in delta_model.attachments] == QUERY_NAMES
    # The config holds the choice, so a saved checkpoint rebuilds without asking again.
    assert delta_model.config.modified_modules == QUERY_NAMES
    assert delta_model.config.interactive_modify is False


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"interactive_modify": True, "modified_modules": ["query"]}, ValueError, "without"),
        ({"interactive_modify": "yes"}, TypeError, "True, False or a port number"),
        ({"interactive_modify": 70000}, TypeError, "port number"),
    ],
)
def test_interactive_modify_is_checked(arguments, error, match):
    with pytest.raises(error, match=match):
        fastdelta.LoraModel(tiny_model("bert"), **arguments)


def _chromium():
    """A headless Chromium driven by selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (test extras)")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install ...)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_ticking_unfolding_and_submitting_in_a_real_browser():
    from selenium.webdriver.common.by import By

    browser = _chromium()
    model = tiny_model("bert")
    selection = Selection(lambda announce: interactive.select_modules(model, 0, announce))
    try:
        browser.get(selection.url)

        def box(*names):
            return browser.find_element(By.ID, "module:" + "|".join(names))

        # The output dense layer of both layers, through the folded 0-1 branch.
        box(*(f"encoder.layer.{i}.output.dense" for i in range(2))).click()
        # Unfold query,key,value of layer 0 only (the layers first), then tick its value.
        layers = browser.find_element(By.XPATH, "//label[starts-with(text(), '0-1')]/..")
        layers.find_element(By.CLASS_NAME, "unfold").click()
        first_layer = [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
        line = box(*first_layer).find_element(By.XPATH, "..")
        line.find_element(By.CLASS_NAME, "unfold").click()
        box("encoder.layer.0.attention.self.value").click()
        assert browser.find_element(By.ID, "count").text == "3 modules ticked"
        browser.find_element(By.ID, "submit").click()
        chosen = selection.join()
    finally:
        browser.quit()
    assert chosen == [
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.output.dense",
        "encoder.layer.1.output.dense",
    ]
