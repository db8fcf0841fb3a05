// Kernels that fail on purpose, compiled only into test and fault-injection builds
// (src/faults.rs): an illegal memory access, and a kernel that never ends.

extern "C" __global__ void ngx_gpu_fault_illegal_address(unsigned int *flag)
{
    // The first page of the address space is never mapped: the device reports an
    // illegal address.
    volatile unsigned int *bad = (volatile unsigned int *) 0x10ull;
    *bad = *flag + 1u;
}

extern "C" __global__ void ngx_gpu_fault_hang(unsigned int *flag)
{
    // The flag is zero and nothing changes it: spins until the process's context goes.
    while (*(volatile unsigned int *) flag == 0u) {
    }
}
