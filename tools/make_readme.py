"""Write README.md from nbs/index.ipynb (nbdev_readme needs quarto, which these machines lack).

Markdown cells are copied, code cells become ```python blocks followed by their outputs (text, or HTML tables); cells marked `#| hide`
are skipped, as are nbdev's front-matter quote line. `python tools/make_readme.py --check` exits 1 when README.md is stale."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _outputs(outs):
    "Markdown for a cell's outputs: text in a ```text block, an HTML display (the epoch table) as HTML"
    res,txt = [],[]
    def flush():
        t = ''.join(txt).rstrip('\n')
        if t: res.append(f'```text\n{t}\n```')
        txt.clear()
    for o in outs:
        if o.get('output_type') == 'stream': txt.append(''.join(o.get('text', '')))
        elif 'data' in o:
            plain = ''.join(o['data'].get('text/plain', ''))
            if 'text/html' in o['data'] and (not plain or plain.startswith('<IPython.core.display')):
                flush(); res.append(''.join(o['data']['text/html']))
            elif plain: txt.append(plain + '\n')
    flush()
    return res

def render(nb_path=root/'nbs'/'index.ipynb'):
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src)
        elif c['cell_type'] == 'code':
            lines = src.split('\n')
            if any(re.match(r'#\|\s*(hide|default_exp|export)', l) for l in lines): continue
            code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
            if not code: continue
            parts.append(f'```python\n{code}\n```')
            parts += _outputs(c.get('outputs', []))
    return '\n\n'.join(parts).strip() + '\n'

if __name__ == '__main__':
    txt = render()
    readme = root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != txt:
            print('README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`'); sys.exit(1)
        print('README.md is up to date')
    else: readme.write_text(txt); print(f'wrote {readme}')
