"""The docs show the code at work: the notebooks are saved with their outputs (`tools/run_notebooks.py`), and the built
site shows them -- the tutorial its epoch table and its figures, every chapter that trains a model some output. Uses the
site `tests/test_docs.py` builds (once per run); skips like it when pandoc or chromium is missing."""
import json, re
from pathlib import Path
import pytest
from test_docs import Dom, NOTEBOOKS, build_docs, pytestmark, site  # noqa: F401  (the shared site fixture)

TRAINS = re.compile(r'\.(fit|fit_one_cycle|fit_flat_cos|fit_sgdr|fine_tune|lr_find)\(')

class OutDom(Dom):
    "A rendered page, counting its cell outputs, its figures and the headers of its tables"
    def __init__(self, text):
        self.n_outputs, self.n_figures, self.th = 0, 0, []
        super().__init__(text)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'cell-output' in (a.get('class') or '').split(): self.n_outputs += 1
        if tag == 'img' and 'figs/' in (a.get('src') or ''): self.n_figures += 1
        super().handle_starttag(tag, attrs)
    def handle_data(self, data):
        if 'th' in self._stack: self.th.append(data.strip())
        super().handle_data(data)

def visible_code(nb_path):
    "The source of the code cells a reader sees (not `#| hide`, not exported)"
    cells = json.loads(Path(nb_path).read_text())['cells']
    srcs = [''.join(c['source']) for c in cells if c['cell_type'] == 'code']
    return [s for s in srcs if not re.search(r'^\s*#\|\s*(hide|export)', s, re.M)]

def trains(nb_path): return any(TRAINS.search(s) for s in visible_code(nb_path))

def _dom(site, nb):
    page = build_docs.page_name(nb, nb.parent)
    assert page in site['pages'], f'{nb.name} produced no page'
    return page, OutDom(Path(site['pages'][page]['dom']).read_text())

@pytest.mark.slow
def test_tutorial_shows_its_table_and_figures(site):
    nb = next(p for p in NOTEBOOKS if p.name == '16_tutorial.ipynb')
    page, dom = _dom(site, nb)
    table = 'train_loss' in dom.th or any('train_loss' in c for c in dom.code)
    assert table, f'{page} shows no epoch table'
    assert dom.n_figures >= 3, f'{page} shows {dom.n_figures} figures, expected at least 3'

@pytest.mark.slow
@pytest.mark.parametrize('nb', [p for p in NOTEBOOKS if trains(p)], ids=lambda p: p.name)
def test_training_chapters_show_outputs(site, nb):
    page, dom = _dom(site, nb)
    assert dom.n_outputs > 0, f'{page} trains a model but shows no output: run `python tools/run_notebooks.py {nb}`'

def test_notebooks_saved_with_outputs():
    "The notebooks that train are committed with their outputs (what the docs build shows)"
    empty = []
    for nb in NOTEBOOKS:
        if not trains(nb): continue
        cells = json.loads(nb.read_text())['cells']
        if not any(c.get('outputs') for c in cells if c['cell_type'] == 'code'): empty.append(nb.name)
    assert not empty, f'saved without outputs: {empty}; run `python tools/run_notebooks.py` on them'

def test_output_check_sees_a_page_without_outputs():
    dom = OutDom('<html><body><div class="cell"><pre>learn.fit(1)</pre></div></body></html>')
    assert (dom.n_outputs, dom.n_figures) == (0, 0)
    dom = OutDom('<html><body><div class="cell-output cell-output-display"><table><tr><th>train_loss</th></tr></table>'
                 '</div><img src="figs/x_1.png"></body></html>')
    assert (dom.n_outputs, dom.n_figures, dom.th) == (1, 1, ['train_loss'])
