// KernelBridge — a kernel library implementing Kernels/include/moe_kernels.h, loaded with dlopen.
//
// - `KernelLibrary` (a final class owning the handle) wraps every C call in exactly one function
//   that turns a non-zero status into a thrown `KernelError`; `DeviceBuffer` owns device memory.
// - ABIConstants.swift names every constant of the header: `KernelLibrary.Status`,
//   `.WeightFormatCode`, `.FillKind`, `.DeclaredRecipe` (with `.Precision`, `.ScaleConvention`,
//   `.Intermediate`), and `KernelFault` for the fault build's names. Code above the bridge uses
//   these names, never bare integers or strings; KernelBridgeTests checks them against the header
//   and against `k_fault_names` in Kernels/src/moe_api.hip.
