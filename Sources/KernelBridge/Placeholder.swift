// module KernelBridge
