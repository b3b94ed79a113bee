/* Empty: this target only exports the types of Kernels/include/moe_kernels.h to Swift. */
#include "CMoEKernelABI.h"
