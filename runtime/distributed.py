"""Data parallelism: one process per device, launched by mpiexec (or mpirun).

    mpiexec -n 4 python train.py -c cudnn ...    # NNabla's NCCL communicator, one GPU a rank
    mpiexec -n 2 python train.py -c cpu ...      # mpi4py, each rank on its share of the cores

The trainer sees one small interface, whatever carries it: `rank`, `size`, `local_rank`, the
mean of the gradients before every solver update, the sum of a few numbers (losses, flags)
across the ranks, and the broadcast of rank 0's parameters and solver states. Without mpiexec
`Processes` is a single process whose collectives do nothing, and no MPI is needed. The GPU
path follows nnabla-examples (MultiProcessDataParallelCommunicator, local rank -> device);
only the object that moves the bytes differs from the CPU path that the tests run.
"""

import os

import numpy as np

from runtime import RunError

# How launchers tell a process its place: MPICH/Intel MPI (PMI_*), Open MPI, PMIx.
SIZE_VARIABLES = ['PMI_SIZE', 'OMPI_COMM_WORLD_SIZE', 'PMIX_SIZE']


def launched_size():
    """How many processes mpiexec started, 1 without it."""
    for name in SIZE_VARIABLES:
        if os.environ.get(name, '').isdigit():
            return int(os.environ[name])
    return 1


class Processes:
    """A single process: every collective is the identity."""

    rank, size, local_rank = 0, 1, 0

    def mean_gradients(self, solver):
        pass

    def sum(self, values):
        return np.asarray(values, np.float64)

    def broadcast(self, arrays):
        pass

    def barrier(self):
        pass

    def any(self, flag):
        """True on every rank if `flag` is true on some rank."""
        return bool(self.sum([float(bool(flag))])[0])

    def mean_losses(self, losses, names):
        """{name: mean over the ranks that computed it} of a step's losses."""
        values = np.array([[losses.get(name, 0.0), name in losses] for name in names]).ravel()
        totals = self.sum(values).reshape(-1, 2)
        return {name: total / count for name, (total, count) in zip(names, totals) if count}

    def broadcast_parameters(self, parameters, solvers):
        """Rank 0's parameters and solver states (moments and step counts) on every rank."""
        if self.size == 1:
            return
        arrays = [p.d for p in parameters.values()]
        states = [solver.get_states() for solver in solvers.values()]
        for solver_states in states:
            for state in solver_states.values():
                arrays.append(np.array([state.t], np.float64))
                # sorted: a loaded state may list its moments in another order
                arrays += [state.pstate[key].d for key in sorted(state.pstate)]
        received = [np.ascontiguousarray(a) for a in arrays]
        self.broadcast(received)
        for parameter, array in zip(parameters.values(), received):
            parameter.d = array
        position = len(parameters)
        for solver, solver_states in zip(solvers.values(), states):
            for state in solver_states.values():
                state.t = int(received[position][0])
                position += 1
                for key in sorted(state.pstate):
                    state.pstate[key].d = received[position]
                    position += 1
            solver.set_states(solver_states)


class MpiProcesses(Processes):
    """The ranks of an mpiexec launch on the CPU, through mpi4py. Each rank keeps to its own
    share of the machine's cores, so that the CPU engine's threads do not compete."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RunError(
                'train.py runs under mpiexec, and on the CPU the ranks talk through '
                'mpi4py, which is not installed (pip install -r '
                'requirements-dev.txt)'
            ) from None
        self.mpi, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, local_size = local.Get_rank(), local.Get_size()
        if hasattr(os, 'sched_setaffinity'):
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) >= local_size:
                os.sched_setaffinity(0, cores[self.local_rank :: local_size])

    def mean_gradients(self, solver):
        parameters = solver.get_parameters()
        gradients = [p.g for p in parameters.values()]
        flat = np.concatenate([g.ravel() for g in gradients]).astype(np.float32)
        self.comm.Allreduce(self.mpi.IN_PLACE, flat, op=self.mpi.SUM)
        flat /= self.size
        start = 0
        for parameter, gradient in zip(parameters.values(), gradients):
            parameter.g = flat[start : start + gradient.size].reshape(gradient.shape)
            start += gradient.size

    def sum(self, values):
        values = np.array(values, np.float64)
        self.comm.Allreduce(self.mpi.IN_PLACE, values, op=self.mpi.SUM)
        return values

    def broadcast(self, arrays):
        for array in arrays:
            self.comm.Bcast(array, root=0)

    def barrier(self):
        self.comm.Barrier()


class NcclProcesses(Processes):
    """The ranks of an mpiexec launch on GPUs, through NNabla's NCCL communicator, as
    nnabla-examples' CommunicatorWrapper does."""

    def __init__(self, context):
        import nnabla as nn
        import nnabla.communicators as C

        self.nn = nn
        self.comm = C.MultiProcessDataParallelCommunicator(context)
        self.comm.init()
        self.rank, self.size, self.local_rank = self.comm.rank, self.comm.size, self.comm.local_rank

    def mean_gradients(self, solver):
        self.comm.all_reduce([p.grad for p in solver.get_parameters().values()], division=True, inplace=True)

    def sum(self, values):
        array = self.nn.NdArray.from_numpy_array(np.array(values, np.float32))
        self.comm.all_reduce([array], division=False, inplace=True)
        return array.data.astype(np.float64)

    def broadcast(self, arrays):
        buffers = [self.nn.NdArray.from_numpy_array(a.astype(np.float32)) for a in arrays]
        self.comm.bcast(buffers, src=0, inplace=True)
        for array, buffer in zip(arrays, buffers):
            array[...] = buffer.data

    def barrier(self):
        self.comm.barrier()


def start_processes(context, device_id):
    """The processes of this launch, and the device this rank computes on: --device-id plus the
    local rank on GPUs, as nnabla-examples does."""
    if launched_size() == 1:
        return Processes(), device_id
    if context in ('cudnn', 'cuda'):
        from nnabla.ext_utils import get_extension_context

        local_rank = int(os.environ.get('MPI_LOCALRANKID', os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)))
        device_id = str(int(device_id) + local_rank)
        return NcclProcesses(get_extension_context('cudnn', device_id=device_id)), device_id
    return MpiProcesses(), device_id
