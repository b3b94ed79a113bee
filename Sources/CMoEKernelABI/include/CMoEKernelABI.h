/* The types of the kernel C ABI, for Swift. Only types are used: KernelBridge resolves the
 * functions with dlsym, so nothing here links against a kernel library. */
#include "../../../Kernels/include/moe_kernels.h"
