import inspect
import re

from tiergate.workers import errors


def _tree_edges() -> set[tuple[str, str]]:
    """(class, parent) pairs drawn by the module docstring's hierarchy."""
    block = errors.__doc__.split("::", 1)[1].split("\n\n", 2)[1]
    edges = set()
    parents: dict[int, str] = {}
    for line in block.splitlines():
        match = re.match(r"^(\s*(?:[│ ]\s*)*(?:[├└]── )?)(\w+)", line)
        assert match, line
        depth = len(match.group(1))
        name = match.group(2)
        parents[depth] = name
        above = [d for d in parents if d < depth]
        if above:
            edges.add((name, parents[max(above)]))
        for deeper in [d for d in parents if d > depth]:
            del parents[deeper]
    return edges


def test_the_docstring_tree_draws_every_error_under_its_bases():
    """Each error class appears in the hierarchy under exactly the classes it derives from."""
    classes = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.TiergateError)
    }
    edges = _tree_edges()
    drawn = {child for child, _ in edges} | {"TiergateError"}
    assert drawn == set(classes)
    for name, cls in classes.items():
        if name == "TiergateError":
            continue
        bases = {base.__name__ for base in cls.__bases__}
        assert {parent for child, parent in edges if child == name} == bases, name


def test_errors_keep_their_arguments_through_pickling():
    """An error with fields survives a pickle round trip (worker pools carry errors)."""
    import pickle

    error = errors.TransientLLMError("openai", "rate limited", 429, retry_after=2.0)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 -- our own bytes
    assert (copy.provider, copy.status_code, copy.retry_after) == ("openai", 429, 2.0)
    assert str(copy) == str(error)
