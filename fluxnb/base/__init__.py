"""What every floor of fluxnb may use: errors, file writing, Ctrl-C, memory reports, plots, progress bars, Hub
error messages.

    errors      FluxnbError: one line saying what is wrong and what to do (first_names: the rows it names)
    choices     the values a setting may take (bases, crops, optimizers ...), checked by fluxnb.config
    files       atomic writes, safetensors I/O, disk-full as one message
    temps       temporaries named after their writer; what a killed one left, removed by the next step
    interrupts  a Ctrl-C is never lost, not even one a __del__ swallowed
    memory      GPU and RAM reports, freeing models, the rehearsal's peak log
    plots       loss curves and image grids (matplotlib)
    progress    tqdm bars whose saved notebook text ends finished, not at 0%
    hub_errors  Hugging Face Hub failures (gated, offline, missing) as one FluxnbError
"""
