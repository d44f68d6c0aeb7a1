"""Environment substitution in config values: `${NAME}`, `${NAME:-default}` and `$${`.

Substitution works on a scalar's text, after YAML has parsed the document, so a variable's
value can never add keys or structure; `yamlsafe.scalar_value` then types the result.
Like the shell, `:-` uses the default when the variable is unset *or* empty. `$${` writes a
literal `${`. Anything else starting with `${` that is not a well-formed reference is an
error rather than being left in place, since it is almost always a typo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sidecar.config.show import quote

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


class EnvError(ValueError):
    pass


def has_reference(text: str) -> bool:
    """Whether `text` refers to a variable (`${NAME}`, `${NAME:-x}`); `$${` alone does not."""
    return "${" in text and any(m.group(1) for m in _REF.finditer(text))


def substitute(text: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    last = 0
    for match in _REF.finditer(text):
        out.append(text[last : match.start()])
        last = match.end()
        token = match.group(0)
        if token == "$${":
            out.append("${")
            continue
        name, default = match.group(1), match.group(2)
        if name is None:
            rest = text[match.start() :]
            shown = rest if len(rest) <= 40 else rest[:40] + "..."
            raise EnvError(
                f"malformed variable reference {quote(shown)} "
                "(write ${NAME} or ${NAME:-default}; $${ for a literal ${)"
            )
        if default is not None and "${" in default:
            raise EnvError(f"nested variable references are not supported in {quote(token)}")
        value = env.get(name)
        if default is not None:
            out.append(value if value else default)
        elif value is None:
            shown = quote(name)
            hint = (
                f"write ${{{name}:-default}} to give a default"
                if shown == f"'{name}'"
                else "write ${NAME:-default} to give a default"
            )
            raise EnvError(f"environment variable {shown} is not set ({hint})")
        else:
            out.append(value)
    out.append(text[last:])
    return "".join(out)
