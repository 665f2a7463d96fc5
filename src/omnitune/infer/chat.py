"""``omnitune chat``: an interactive session that keeps the conversation.

Each input line is a prompt, or a command: ``/image PATH``, ``/video PATH``, ``/audio PATH``
attach a file to the next prompt; ``/reset`` forgets the conversation (and pending files);
``/exit`` (or end of input) ends the session. Every prompt is answered with the whole conversation
so far (its earlier turns, replies and media), re-encoded each turn exactly as a multi-turn
training sample would be. Replies go to ``out`` one per turn; the "you>" prompt and notes go to
``err`` only when the input is a terminal, so piped sessions give just the replies.

A bad command or file is reported on ``err`` as ``omnitune: error: ...`` and the session goes on
(an interactive user retypes it); the exit status is then 2, so scripts piping a session notice.
"""
from __future__ import annotations

from omnitune.data.templates import KINDS
from omnitune.infer.loader import InferError
from omnitune.infer.prompt import check_media

COMMANDS = {"/" + k: k for k in KINDS}


def run_chat(generator, sampling, system: str | None, inp, out, err, interactive: bool) -> int:
    conv = generator.new_conversation(system)
    pending: dict[str, list[str]] = {k: [] for k in KINDS}
    turn, failed = 0, False

    def note(msg: str) -> None:
        if interactive:
            print(msg, file=err, flush=True)

    note("omnitune chat: /image PATH, /video PATH, /audio PATH attach a file to the next prompt; "
         "/reset, /exit")
    while True:
        if interactive:
            print("you> ", end="", file=err, flush=True)
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        word, _, arg = line.strip().partition(" ")
        try:
            if word == "/exit":
                break
            if word == "/reset":
                conv = generator.new_conversation(system)
                pending = {k: [] for k in KINDS}
                note("(conversation reset)")
                continue
            if word in COMMANDS:
                kind, path = COMMANDS[word], arg.strip()
                if not path:
                    raise InferError(f"{word}: needs a file path, e.g. {word} clip.{'mp4' if kind == 'video' else 'x'}")
                if generator.template.media(kind) is None:
                    raise InferError(f"{word} {path}: this model reads no {kind}; use an Omni model")
                check_media(kind, path, f"{word} {path}", generator.cfg)
                pending[kind].append(path)
                note(f"({kind} {path} attached to the next prompt)")
                continue
            if word.startswith("/") and word[1:].isalpha():
                raise InferError(f"{word}: unknown command; use /image, /video, /audio, /reset or /exit")
            turn += 1
            where = f"chat turn {turn}"
            trial = conv.copy()   # the turn joins the conversation only once it has its reply
            trial.add_user(generator.template, line, pending, where)
            reply = generator.reply(trial, sampling, where)
        except InferError as e:
            print(f"omnitune: error: {e}", file=err, flush=True)
            failed = True
            continue
        trial.add_assistant(reply)
        conv, pending = trial, {k: [] for k in KINDS}
        print(reply, file=out, flush=True)
    return 2 if failed else 0
