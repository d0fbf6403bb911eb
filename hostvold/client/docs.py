"""Man pages and bash completion, generated from the parsers and the documented config.

    python -m hostvold.client.docs DIRECTORY

writes ``hostvolctl.1``, ``hostvold.8``, ``hostvold.conf.5`` and the bash completion
``hostvolctl`` into DIRECTORY (the set-up installs them). Generated, so they never drift
from what the commands accept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hostvold import __version__
from hostvold.client.wire import EXIT_CODES

REPO = Path(__file__).resolve().parent.parent.parent
# positional arguments that name an object, and the command that lists them
OBJECT_LISTS = {"volume": "volumes", "volumes": "volumes", "snapshot": "snapshots",
                "job": "jobs", "target": "volumes", "group": "group list"}
# option values that name an object (by the option's dest), and the command that lists them
OPTION_LISTS = {"since": "snapshots", "to": "snapshots"}
# positional arguments that name a file of the client's
FILE_ARGS = ("path", "destination", "output", "base", "increment")


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes doubled, no line starting with . or '."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser,
                                                              str]]:
    """Every command as (name, parser, help), a command with actions of its own (``group``)
    followed by each of them as ``group create`` etc."""
    found = []
    helps = _helps(parser)
    for name, sub in _subcommands(parser).items():
        found.append((name, sub, helps.get(name, "")))
        found += [(f"{name} {inner}", action, text)
                  for inner, action, text in _commands(sub)]
    return found


def man_client(parser: argparse.ArgumentParser) -> str:
    lines = [f'.TH HOSTVOLCTL 1 "" "hostvold {__version__}" "User Commands"', ".SH NAME",
             "hostvolctl \\- manage hostvold's volumes and snapshots over D\\-Bus",
             ".SH SYNOPSIS", "\\fBhostvolctl\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
             ".SH DESCRIPTION",
             _roff("hostvolctl talks to the hostvold daemon on the system bus (or the bus "
                   "--bus or HOSTVOLD_BUS names). Changes need root or membership of the "
                   "admin group; reads are open to every local user. Sizes are printed in "
                   "IEC units; --json gives exact bytes."),
             ".SH OPTIONS"]
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            lines += [".TP", "\\fB" + _roff(", ".join(action.option_strings)) + "\\fR",
                      _roff(action.help or "")]
    lines.append(".SH COMMANDS")
    for _, sub, text in _commands(parser):
        usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        lines += [".TP", "\\fB" + _roff(usage) + "\\fR", _roff(text)]
        if sub.description:  # a command's longer description, below its summary
            lines += [".IP", _roff(sub.description)]
    lines += [".SH EXIT STATUS", ".nf", _roff(EXIT_CODES), ".fi",
              ".SH SEE ALSO", "\\fBhostvold\\fR(8), \\fBhostvold.conf\\fR(5)"]
    return "\n".join(lines) + "\n"


def man_daemon() -> str:
    return "\n".join([
        f'.TH HOSTVOLD 8 "" "hostvold {__version__}" "System Administration"', ".SH NAME",
        "hostvold \\- hypervisor\\-side volume daemon", ".SH SYNOPSIS",
        "\\fBhostvold\\fR [\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-\\-version\\fR]",
        ".SH DESCRIPTION",
        _roff("hostvold manages block volumes stored as raw or qcow2 files on shares mounted "
              "on this host, and takes and deletes their snapshots: offline with qemu-img, "
              "and online, for volumes attached to running domains, through libvirt. It "
              "serves org.hostvold1 on the system bus and is run by systemd "
              "(hostvold.service, Type=notify, with a watchdog). Every multi-step operation "
              "records its intent first and is finished or undone at the next start."),
        ".SH OPTIONS", ".TP", "\\fB\\-\\-config\\fR \\fIPATH\\fR",
        _roff("the configuration file (default /etc/hostvold/hostvold.conf; without one, "
              "the embedded defaults)."),
        ".SH SIGNALS", ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR",
        _roff("stop: running jobs stop at a recoverable step."), ".TP", "\\fBSIGUSR1\\fR",
        _roff("write every thread's stack to the log."),
        ".SH EXIT STATUS", _roff("0 after a clean stop; 1 when it cannot start; 78 for an "
                                 "invalid configuration."),
        ".SH SEE ALSO", "\\fBhostvolctl\\fR(1), \\fBhostvold.conf\\fR(5)"]) + "\n"


def man_config(example: str) -> str:
    return "\n".join([
        f'.TH HOSTVOLD.CONF 5 "" "hostvold {__version__}" "File Formats"', ".SH NAME",
        "hostvold.conf \\- configuration of the hostvold daemon", ".SH DESCRIPTION",
        _roff("An INI file, /etc/hostvold/hostvold.conf by default. Every key, its default "
              "and what it does follows, as the documented example file has them; a bad "
              "value stops the daemon before any side effect (exit status 78), and "
              "`hostvolctl check-config PATH` checks a file offline."),
        ".SH FILE", ".nf", _roff(example), ".fi",
        ".SH SEE ALSO", "\\fBhostvold\\fR(8), \\fBhostvolctl\\fR(1)"]) + "\n"


def _valued_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options, of any command, that take a value (the word after them is theirs)."""
    valued: dict[str, bool] = {}
    for each in [parser, *(sub for _, sub, _ in _commands(parser))]:
        for action in each._actions:
            for option in action.option_strings:
                takes = action.nargs != 0
                if valued.setdefault(option, takes) != takes:
                    raise ValueError(f"{option} takes a value in one command, not in another; "
                                     "the completion cannot tell its words apart")
    return [option for option, takes in valued.items() if takes]


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion for hostvolctl: options, commands (and the actions of ``group``),
    the choices of arguments and options, the ids of volumes, snapshots, jobs and groups
    (asked from the running daemon; also as the values of --from and --to), and file
    names for the arguments that name the client's files."""
    commands = _commands(parser)
    nested = [name for name, sub, _ in commands if _subcommands(sub)]
    cases = []
    for name, sub, _ in commands:
        actions = _subcommands(sub)
        positionals = [a for a in sub._actions if not a.option_strings and a.dest != "help"
                       and not isinstance(a, argparse._SubParsersAction)]
        options = " ".join(o for a in sub._actions for o in a.option_strings)
        kinds = " ".join("@file" if a.dest in FILE_ARGS else
                         OBJECT_LISTS.get(a.dest, "-").replace(" ", ",") for a in positionals)
        choices = " ".join(",".join(a.choices) if a.choices else "-" for a in positionals)
        if actions:  # its first word is one of its actions
            kinds, choices = "-", ",".join(actions)
        values = " ".join([f"{o}={','.join(a.choices)}" for a in sub._actions if a.choices
                           for o in a.option_strings]
                          + [f"{o}=@{OPTION_LISTS[a.dest].replace(' ', ',')}"
                             for a in sub._actions if a.dest in OPTION_LISTS
                             and a.option_strings for o in a.option_strings])
        more = int(bool(positionals) and positionals[-1].nargs in ("*", "+"))
        cases.append(f'        "{name}") kinds=({kinds or "-"}); choices=({choices or "-"}); '
                     f'opts="{options}"; values="{values}"; more={more} ;;')
    top = " ".join(o for a in parser._actions for o in a.option_strings)
    top_names = " ".join(_subcommands(parser))
    valued = " ".join(_valued_options(parser))
    return f'''# bash completion for hostvolctl (generated by hostvold.client.docs)
_hostvolctl_ids() {{  # $1: the command that lists them, its words joined by commas
    hostvolctl __complete ${{1//,/ }} 2>/dev/null  # the ids alone, one a line
}}
_hostvolctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command=""
    local index=0 i valued=" {valued} " nested=" {' '.join(nested)} "
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ $valued == *" ${{COMP_WORDS[i]}} "* ]]; then
            ((i++))  # an option's value
        elif [[ ${{COMP_WORDS[i]}} == -* ]]; then
            :
        elif [ -z "$command" ]; then
            command=${{COMP_WORDS[i]}}
        elif [ "$index" = 0 ] && [[ $nested == *" $command "* ]]; then
            command="$command ${{COMP_WORDS[i]}}"  # an action: "group create"
        else
            ((index++))
        fi
    done
    local kinds=(-) choices=(-) opts="{top}" values="" more=0 pair
    case $command in
        "") ;;
{chr(10).join(cases)}
        *) return ;;
    esac
    if [[ $valued == *" $prev "* ]]; then  # the value of an option: its choices, if any
        for pair in $values; do
            if [ "${{pair%%=*}}" = "$prev" ]; then
                pair=${{pair#*=}}
                if [[ $pair == @* ]]; then  # the ids of the objects it names
                    COMPREPLY=($(compgen -W "$(_hostvolctl_ids "${{pair#@}}")" -- "$cur"))
                else
                    COMPREPLY=($(compgen -W "${{pair//,/ }}" -- "$cur"))
                fi
            fi
        done
        return
    fi
    if [ -z "$command" ]; then
        COMPREPLY=($(compgen -W "{top_names} {top}" -- "$cur"))
        return
    fi
    if ((more && index >= ${{#kinds[@]}})); then
        index=$((${{#kinds[@]}} - 1))  # a list of the last argument's kind: VOL...
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [ "${{choices[index]:--}}" != - ]; then
        COMPREPLY=($(compgen -W "${{choices[index]//,/ }}" -- "$cur"))
    elif [ "${{kinds[index]:--}}" = @file ]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [ "${{kinds[index]:--}}" != - ]; then
        COMPREPLY=($(compgen -W "$(_hostvolctl_ids "${{kinds[index]}}")" -- "$cur"))
    fi
}}
complete -F _hostvolctl hostvolctl
'''


def main() -> None:
    from hostvold.client.main import build_parser
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    target.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    example = (REPO / "hostvold.conf").read_text() if (REPO / "hostvold.conf").exists() \
        else "(see /usr/share/doc/hostvold/hostvold.conf.example)"
    (target / "hostvolctl.1").write_text(man_client(parser))
    (target / "hostvold.8").write_text(man_daemon())
    (target / "hostvold.conf.5").write_text(man_config(example))
    (target / "hostvolctl").write_text(bash_completion(parser))


if __name__ == "__main__":
    main()
