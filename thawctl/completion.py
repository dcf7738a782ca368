"""`thawctl completion bash|zsh|fish`: a shell completion script generated from the parser.

No extra dependency: the script is built by walking thawctl's argparse tree, so a new command
or option completes as soon as it exists. Snapshot names complete from `thawctl ls -q`
(quietly nothing when no daemon runs); NAME|PATH arguments also complete files.

    thawctl completion bash > /etc/bash_completion.d/thawctl
    thawctl completion zsh > "${fpath[1]}/_thawctl"
    thawctl completion fish > ~/.config/fish/completions/thawctl.fish
"""

from __future__ import annotations

import argparse
from typing import Any

from thawctl import exitcodes
from thawctl.context import Context

# How positionals complete, by metavar.
NAMES_AND_FILES = "NAME|PATH"
FILES = "PATH"
# Option values that are files, by metavar.
FILE_VALUES = ("PATH", "OUTPUT", "DIR", "SOCKET")
SHELLS = ("bash", "zsh", "fish")


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash, zsh or fish. Install: "
        "`thawctl completion bash > /etc/bash_completion.d/thawctl`, "
        '`thawctl completion zsh > "${fpath[1]}/_thawctl"`, or '
        "`thawctl completion fish > ~/.config/fish/completions/thawctl.fish`; or eval it in "
        "your shell's rc.",
    )
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=run_completion)


def run_completion(ctx: Context) -> int:
    assert ctx.parser is not None  # thawctl/cli.py's main hands its parser over
    model = describe(ctx.parser)
    ctx.out.write({"bash": bash, "zsh": zsh, "fish": fish}[ctx.args.shell](model))
    return exitcodes.OK


def describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{"options": [...], "commands": {name: {"help", "options", "positionals"}}} of a parser."""

    def options(p: argparse.ArgumentParser) -> list[dict[str, Any]]:
        out = []
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS:
                continue
            out.append(
                {
                    "flags": list(a.option_strings),
                    "takes_value": a.nargs != 0,
                    "choices": [str(c) for c in a.choices] if a.choices else [],
                    "help": (a.help or "").replace("%(default)s", str(a.default)),
                    "metavar": a.metavar or a.dest.upper(),
                }
            )
        return out

    commands: dict[str, Any] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            for name, sub in action.choices.items():
                positionals = [
                    {"metavar": a.metavar or a.dest, "choices": [str(c) for c in a.choices or []]}
                    for a in sub._actions
                    if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
                ]
                commands[name] = {
                    "help": helps.get(name, ""),
                    "options": options(sub),
                    "positionals": positionals,
                }
    return {"options": options(parser), "commands": commands}


def _words(values: list[str]) -> str:
    return " ".join(values)


def bash(model: dict[str, Any]) -> str:
    cases = []
    for name, cmd in sorted(model["commands"].items()):
        flags = [f for o in cmd["options"] for f in o["flags"]]
        value_cases = []
        for o in cmd["options"]:
            if not o["takes_value"]:
                continue
            pattern = "|".join(o["flags"])
            if o["choices"]:
                action = f'COMPREPLY=($(compgen -W "{_words(o["choices"])}" -- "$cur"))'
            elif o["metavar"] in FILE_VALUES:
                action = "_thawctl_files"
            else:
                action = ":"
            value_cases.append(f"            {pattern}) {action}; return;;")
        positional = "_thawctl_files"
        pos = cmd["positionals"]
        if pos and pos[0]["choices"]:
            positional = f'COMPREPLY=($(compgen -W "{_words(pos[0]["choices"])}" -- "$cur"))'
        elif pos and pos[0]["metavar"] == NAMES_AND_FILES:
            positional = "_thawctl_names_and_files"
        elif not pos:
            positional = ":"
        cases.append(
            f"        {name})\n"
            f'            case "$prev" in\n'
            + "\n".join(value_cases)
            + ("\n" if value_cases else "")
            + "            esac\n"
            f'            if [[ "$cur" == -* ]]; then\n'
            f'                COMPREPLY=($(compgen -W "{_words(flags)}" -- "$cur"))\n'
            f"            else {positional}; fi\n"
            "            ;;"
        )
    global_flags = _words([f for o in model["options"] for f in o["flags"]])
    commands = _words(sorted(model["commands"]))
    return f"""# bash completion for thawctl (generated by `thawctl completion bash`)
_thawctl_files() {{ COMPREPLY=($(compgen -f -- "$cur")); }}
_thawctl_names_and_files() {{
    local names
    names=$(thawctl ls -q 2>/dev/null)
    COMPREPLY=($(compgen -W "$names" -- "$cur") $(compgen -f -- "$cur"))
}}
_thawctl() {{
    local cur prev cmd i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --socket) ((i++));;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        if [[ "$prev" == --socket ]]; then _thawctl_files; return; fi
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "{global_flags}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "{commands}" -- "$cur"))
        fi
        return
    fi
    case "$cmd" in
{chr(10).join(cases)}
    esac
}}
complete -o filenames -F _thawctl thawctl
"""


def _zsh_quote(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("'", "'\\''")
        .replace("[", "\\[")
        .replace("]", "\\]")
        .replace(":", "\\:")
    )


def _zsh_option(o: dict[str, Any]) -> str:
    flags = o["flags"]
    spec = "{" + ",".join(flags) + "}" if len(flags) > 1 else flags[0]
    excl = "(" + " ".join(flags) + ")" if len(flags) > 1 else ""
    text = f"'{excl}{spec}[{_zsh_quote(o['help'])}]"
    if o["takes_value"]:
        if o["choices"]:
            text += f":{o['metavar'].lower()}:({' '.join(o['choices'])})"
        elif o["metavar"] in FILE_VALUES:
            text += f":{o['metavar'].lower()}:_files"
        else:
            text += f":{o['metavar'].lower()}: "
    return text + "'"


def zsh(model: dict[str, Any]) -> str:
    described = "\n".join(
        f"        '{name}:{_zsh_quote(cmd['help'])}'"
        for name, cmd in sorted(model["commands"].items())
    )
    cases = []
    for name, cmd in sorted(model["commands"].items()):
        specs = [_zsh_option(o) for o in cmd["options"]]
        for p in cmd["positionals"]:
            if p["choices"]:
                specs.append(f"':{p['metavar'].lower()}:({' '.join(p['choices'])})'")
            elif p["metavar"] == NAMES_AND_FILES:
                specs.append("':snapshot:_thawctl_snapshots'")
            else:
                specs.append("':path:_files'")
        cases.append(
            f"        {name})\n            _arguments -s \\\n                "
            + " \\\n                ".join(specs)
            + "\n            ;;"
        )
    globals_ = " \\\n        ".join(_zsh_option(o) for o in model["options"])
    return f"""#compdef thawctl
# zsh completion for thawctl (generated by `thawctl completion zsh`)

_thawctl_snapshots() {{
    local -a names
    names=(${{(f)"$(thawctl ls -q 2>/dev/null)"}})
    _alternative 'snapshots:snapshot:compadd -a names' 'files:file:_files'
}}

_thawctl() {{
    local curcontext="$curcontext" state line
    typeset -A opt_args
    _arguments -C \\
        {globals_} \\
        '1:command:->command' \\
        '*::arg:->args'
    case $state in
    command)
        local -a commands
        commands=(
{described}
        )
        _describe -t commands 'thawctl command' commands
        ;;
    args)
        case $line[1] in
{chr(10).join(cases)}
        esac
        ;;
    esac
}}

if [[ "$funcstack[1]" == "_thawctl" ]]; then
    _thawctl "$@"
else
    compdef _thawctl thawctl
fi
"""


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_option(condition: str, o: dict[str, Any]) -> str:
    parts = ["complete -c thawctl", f"-n {_fish_quote(condition)}"]
    for flag in o["flags"]:
        parts.append(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}")
    if o["takes_value"]:
        if o["choices"]:
            parts.append(f"-x -a {_fish_quote(' '.join(o['choices']))}")
        elif o["metavar"] in FILE_VALUES:
            parts.append("-r -F")
        else:
            parts.append("-x")
    if o["help"]:
        parts.append(f"-d {_fish_quote(_first_clause(o['help']))}")
    return " ".join(parts)


def _first_clause(text: str) -> str:
    """fish shows descriptions beside each candidate: the help up to its first parenthesis."""
    return " ".join(text.split("(")[0].split()) or text


def fish(model: dict[str, Any]) -> str:
    # Global options that take a value: their value is not the command word.
    valued = " ".join(f for o in model["options"] if o["takes_value"] for f in o["flags"])
    lines = [_fish_option("__thawctl_using", o) for o in model["options"]]
    for name, cmd in sorted(model["commands"].items()):
        lines.append(
            f"complete -c thawctl -n '__thawctl_using' -a {name} -d {_fish_quote(cmd['help'])}"
        )
    for name, cmd in sorted(model["commands"].items()):
        using = f"__thawctl_using {name}"
        lines += [_fish_option(using, o) for o in cmd["options"]]
        pos = cmd["positionals"]
        if pos and pos[0]["choices"]:
            choices = _fish_quote(" ".join(pos[0]["choices"]))
            lines.append(f"complete -c thawctl -n '{using}' -a {choices}")
        elif pos and pos[0]["metavar"] == NAMES_AND_FILES:
            lines.append(f"complete -c thawctl -n '{using}' -F -a '(__thawctl_snapshots)'")
        elif pos:
            lines.append(f"complete -c thawctl -n '{using}' -F")
    body = "\n".join(lines)
    return f"""# fish completion for thawctl (generated by `thawctl completion fish`)

# The command word: the first argument that is not an option or a global option's value.
function __thawctl_command
    set -l words (commandline -opc)
    set -e words[1]
    while set -q words[1]
        switch $words[1]
            case {valued}
                set -e words[1]
            case '-*'
            case '*'
                echo $words[1]
                return 0
        end
        set -e words[1]
    end
    return 1
end

# No argument: true before the command word; one: true after that command word.
function __thawctl_using
    set -l cmd (__thawctl_command)
    if set -q argv[1]
        test "$cmd" = "$argv[1]"
    else
        test -z "$cmd"
    end
end

function __thawctl_snapshots
    command -q thawctl; and thawctl ls -q 2>/dev/null
end

complete -c thawctl -f
{body}
"""
