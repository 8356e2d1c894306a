"What machine a bench ran on, for the header line of its table"
import os, platform, time

def machine_line(script:str):
    "`# bench/<script>  <date>  <cpu>, <n> cores, python <v>, torch <v>`"
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for l in open('/proc/cpuinfo'):
            if l.startswith('model name'): cpu = l.split(':', 1)[1].strip(); break
    except OSError: pass
    return (f"# bench/{script}  {time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}, torch {torch.__version__}")
