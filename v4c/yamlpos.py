"""Load YAML and remember where every key and value sits, so errors can name a line and column."""

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Pos:
    line: int  # 1-based
    col: int  # 1-based


class YamlError(ValueError):
    def __init__(self, pos: Pos, message: str):
        super().__init__(message)
        self.pos, self.message = pos, message


def _pos(mark) -> Pos:
    return Pos(mark.line + 1, mark.column + 1)


def load_with_positions(text: str):
    """-> (data, positions) where positions maps a path tuple (keys / list indices) to
    (position of the key, position of the value). The root path () maps to the document start."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {(): (Pos(1, 1), Pos(1, 1))}
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YamlError(_pos(mark) if mark else Pos(1, 1), f"invalid YAML: {e.problem or e.context}") from None
    finally:
        loader.dispose()
    positions = {(): (_pos(node.start_mark), _pos(node.start_mark))}

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                key = loader.construct_object(k) if isinstance(k, yaml.ScalarNode) else str(k)
                if key in seen:
                    raise YamlError(_pos(k.start_mark), f"duplicate key {key!r}")
                seen.add(key)
                positions[path + (key,)] = (_pos(k.start_mark), _pos(v.start_mark))
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                positions[path + (i,)] = (_pos(v.start_mark), _pos(v.start_mark))
                walk(v, path + (i,))

    walk(node, ())
    return data, positions
