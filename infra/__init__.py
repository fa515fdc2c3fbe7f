"""Machinery the PAL core needs but a student steps over: file I/O, hub access and checkpoint readers, process
groups, the run directory, option declaration and checks, training checkpoints.

The mirror image of extras/: the core (model, data, dpo, nli, pal) imports these modules, and they import no core
file (tests/test_layout.py checks both directions). Every function takes plain data: paths, dicts, tensors.
PAL's own rules (which options shape which stage, what a stage writes) stay in pal.py.

    files      atomic writes; JSON and JSON lines, read with errors that name the file and line; the .partial writer
    hub        a model directory from a local path or a hub id; checkpoint file readers (never unpickling)
    tokfiles   tokenizer files (tokenizer.json, merges, tiktoken and vocab files) read into plain data
    datafiles  data files read line by line, every irregularity counted or named with its file:line
    exports    what an exported model carries besides its weights: adapters, tokenizer files, generation config
    dist       torchrun: the process group and its one timeout rule, ranks, barriers, work shared across ranks
    rundir     one process per run directory (a lock); what each stage was built from (stages.json), --redo
    options    options declared once with their ranges: command-line flags and range checks from one list
    ckpt       training checkpoints: save atomically, resume exactly (optimizer, schedule, random streams)
    trainlog   the running sums of a training log and the record of one log line
"""
