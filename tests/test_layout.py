"""The project's module layout: imports run one way, down three layers, with no cycle, no stage imports another
stage (but the exceptions listed, edge by edge), and every module fits in a head.

Read from the source with ``ast`` (nothing is imported): every import of every top-level module and of every file
under beit_finetuning/, including the imports inside functions and ``importlib.import_module('literal')``.
"""
import ast
import pathlib
from typing import Dict, List, Optional, Set

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 500
STAGE, MIDDLE, FLOOR = 'stage', 'middle', 'floor'
RANK = {STAGE: 2, MIDDLE: 1, FLOOR: 0}  # a module imports modules of its own rank or lower, never higher
PACKAGE = 'beit_finetuning'  # the fine-tuning stage: every module in it is a stage

# Every top-level module, by layer. A new module goes in here (the test below says so); a name whose file does not
# exist (yet, or any more) is skipped.
LAYERS: Dict[str, str] = {
    # stages: the scripts a user runs, and the benchmarks
    'main': STAGE, 'main_linear': STAGE, 'eval_zeroshot': STAGE, 'make_dataset': STAGE, 'export_open_clip': STAGE,
    'run_with_submitit': STAGE, 'run_with_submitit_linear': STAGE,
    'bench': STAGE, 'bench_train': STAGE, 'bench_data': STAGE, 'bench_save': STAGE, 'bench_original': STAGE,
    'bench_input': STAGE,
    # middle: models, losses, data, the training engine and its long-run parts, the model zoo
    'engine': MIDDLE, 'guard': MIDDLE, 'faults': MIDDLE,
    'models': MIDDLE, 'towers': MIDDLE, 'losses': MIDDLE, 'zoo': MIDDLE,
    'datasets': MIDDLE, 'device_decode': MIDDLE, 'samples': MIDDLE, 'wds_data': MIDDLE, 'demo_data': MIDDLE,
    'downstream': MIDDLE, 'train_data': MIDDLE, 'zeroshot': MIDDLE, 'options': MIDDLE,
    # floor: what everything may use (checkpoints.py: checkpoint files and the one atomic writer, re-exported by utils)
    'augment': FLOOR, 'views': FLOOR, 'batch_views': FLOOR, 'jpeg_decoders': FLOOR, 'metadata': FLOOR, 'utils': FLOOR,
    'progress': FLOOR, 'checkpoints': FLOOR, 'staging': FLOOR,
}

# No stage imports another stage: what two stages share lives in the middle (zeroshot.py is eval_zeroshot.py's
# library; main.py, main_linear.py and export_open_clip.py import it, not the script). The beit_finetuning package is
# one stage in several files, so its modules import each other. The exceptions, each one edge (stage -> the stages it
# may import) that the code needs; an edge the code no longer has must go (test_stage_import_exceptions_are_all_used).
STAGE_IMPORTS_ALLOWED: Dict[str, Set[str]] = {
    # The launchers are front ends of run_with_submitit.py, the launcher library, which itself imports no stage: it
    # reaches the stage it launches by name only (importlib.import_module(STAGES[stage].module), LAUNCHES_BY_NAME).
    'run_with_submitit_linear': {'run_with_submitit'},
    f'{PACKAGE}.run_with_submitit_finetune': {'run_with_submitit'},
    # The benchmarks: bench.py is the one command line over bench_train.py and bench_data.py (it dispatches to them and
    # re-exports their names); bench_data.py times bench_input.py's stages and bench_original.py's original pipeline,
    # with bench_train.py's device sync; bench_train.py and bench_save.py measure main.py's own engine and optimizer,
    # built from main.py's flag defaults. No user script imports a benchmark; no benchmark imports a script but main.
    'bench': {'bench_data', 'bench_train'},
    'bench_data': {'bench_input', 'bench_original', 'bench_train'},
    'bench_train': {'main'},
    'bench_save': {'main'},
}
LAUNCHES_BY_NAME = {'run_with_submitit'}  # the only modules that pass a computed name to importlib.import_module


def _files() -> Dict[str, pathlib.Path]:
    """Module name -> file: the top-level modules and the beit_finetuning package's (``beit_finetuning.x``)."""
    files = {p.stem: p for p in sorted(REPO.glob('*.py'))}
    for p in sorted((REPO / PACKAGE).glob('*.py')):
        files[PACKAGE if p.stem == '__init__' else f'{PACKAGE}.{p.stem}'] = p
    return files


def _is_packaged(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + '.')


def _layer(module: str) -> Optional[str]:
    """The module's layer; None for a module not placed yet (``test_every_top_level_module_is_placed_in_a_layer``)."""
    return STAGE if _is_packaged(module) else LAYERS.get(module)


def _imports(module: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The project modules that ``module`` imports, anywhere in its file."""
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif _is_import_module_call(node):  # importlib.import_module('name'): a computed name is LAUNCHES_BY_NAME's
            literal = node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            targets = [node.args[0].value] if literal else []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: from the package, going up level - 1 packages
                parts = package.split('.')[:len(package.split('.')) - node.level + 1] if package else []
                base = '.'.join(parts + ([base] if base else []))
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` imports a, a.b and a.b.c: the deepest we know
                target = target.rpartition('.')[0]
            if target and target != module:
                found.add(target)
    return found


def _is_import_module_call(node: ast.AST) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == 'import_module') or \
        (isinstance(f, ast.Name) and f.id in ('import_module', '__import__'))


def _imports_by_computed_name(path: pathlib.Path) -> bool:
    """Whether the file calls importlib.import_module / __import__ with anything but a string literal."""
    return any(_is_import_module_call(node) and not (
        node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
        for node in ast.walk(ast.parse(path.read_text(), str(path))))


def _stage_of(module: str) -> str:
    """The stage a module belongs to: the beit_finetuning package is one stage, any other stage module its own."""
    return PACKAGE if _is_packaged(module) else module


def _stage_imports() -> Dict[str, Set[str]]:
    """Stage module -> the modules of other stages it imports."""
    return {m: {d for d in deps if _layer(d) == STAGE and _stage_of(d) != _stage_of(m)}
            for m, deps in _graph().items() if _layer(m) == STAGE}


def _graph() -> Dict[str, Set[str]]:
    """Module -> the project modules it imports."""
    files = _files()
    return {m: _imports(m, p, set(files)) for m, p in files.items()}


def test_every_top_level_module_is_placed_in_a_layer():
    unplaced = [m for m in _files() if not _is_packaged(m) and m not in LAYERS]
    assert not unplaced, (f'{", ".join(f"{m}.py" for m in unplaced)}: place each new module in LAYERS of '
                          f'tests/test_layout.py as a stage (a script), middle (models, losses, data, engine, zoo) '
                          f'or floor (imported by everything, imports no project module above it)')


def test_project_imports_have_no_cycle():
    graph = _graph()
    cycles: List[str] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(path: List[str]) -> None:  # depth first; path[-1] is the module visited
        state[path[-1]] = 1
        for dep in sorted(graph[path[-1]]):
            if state.get(dep) == 1:  # back to a module on the path: a cycle
                cycles.append(' -> '.join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(path + [dep])
        state[path[-1]] = 2

    for module in sorted(graph):
        if module not in state:
            visit([module])
    assert not cycles, 'import cycles among the project modules:\n  ' + '\n  '.join(cycles)


def test_modules_import_only_their_own_or_lower_layers():
    upward = [f'{m} ({_layer(m)}) imports {d} ({_layer(d)})' for m, deps in sorted(_graph().items())
              for d in sorted(deps) if _layer(m) and _layer(d) and RANK[_layer(d)] > RANK[_layer(m)]]
    assert not upward, ('imports must go stage -> middle -> floor, never up:\n  ' + '\n  '.join(upward))


def test_no_stage_imports_another_stage_but_the_listed_exceptions():
    found = [f'{m} imports {d}' for m, deps in sorted(_stage_imports().items()) for d in sorted(deps)
             if d not in STAGE_IMPORTS_ALLOWED.get(m, set())]
    assert not found, ('a stage (a script a user runs, or a benchmark) imports another stage; move what they share '
                       'into a middle module (as zeroshot.py holds eval_zeroshot.py\'s library), or, if it cannot be '
                       'shared, list the edge in STAGE_IMPORTS_ALLOWED with the reason:\n  ' + '\n  '.join(found))


def test_stage_import_exceptions_are_all_used():
    imports = _stage_imports()
    unused = [f'{m} -> {d}' for m, deps in sorted(STAGE_IMPORTS_ALLOWED.items()) for d in sorted(deps)
              if d not in imports.get(m, set())]
    assert not unused, 'STAGE_IMPORTS_ALLOWED lists imports the code no longer has; remove:\n  ' + '\n  '.join(unused)


def test_only_the_launcher_imports_modules_by_a_computed_name():
    computed = sorted(m for m, p in _files().items() if _imports_by_computed_name(p))
    assert computed == sorted(LAUNCHES_BY_NAME)


def test_every_module_fits_the_line_budget():
    over = [f'{p.relative_to(REPO)}: {n} lines' for p in _files().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not over, f'modules over the {MAX_LINES}-line budget (split them along their section seams):\n  ' + \
        '\n  '.join(over)


def test_layout_checks_see_imports_inside_functions_and_relative_ones(tmp_path):
    """The parser itself: function-level, dotted, from-package and relative imports all count; others do not."""
    (tmp_path / 'pkg').mkdir()
    source = ('import os\nimport utils\n\ndef f():\n    import models\n    from zoo import RELEASED\n'
              '    from pkg import sub\n    from . import sib\n    import torch.nn\n')
    path = tmp_path / 'pkg' / 'mod.py'
    path.write_text(source)
    known = {'utils', 'models', 'zoo', 'pkg', 'pkg.sub', 'pkg.sib', 'pkg.mod', 'main', 'bench'}
    assert _imports('pkg.mod', path, known) == {'utils', 'models', 'zoo', 'pkg', 'pkg.sub', 'pkg.sib'}
    assert not _imports_by_computed_name(path)
    # importlib with a literal name is an import; with a computed name it is one only the launcher may make
    path.write_text(source + "    importlib.import_module('main')\n    __import__('bench')\n")
    assert _imports('pkg.mod', path, known) == {'utils', 'models', 'zoo', 'pkg', 'pkg.sub', 'pkg.sib', 'main', 'bench'}
    assert not _imports_by_computed_name(path)
    path.write_text(source + "    name = 'main'\n    importlib.import_module(name)\n")
    assert _imports_by_computed_name(path)
