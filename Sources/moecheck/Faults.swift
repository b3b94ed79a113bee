import ArgumentParser

struct Faults: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "(not yet available)")
    func run() throws { throw ToolFailure("moecheck faults: not implemented yet") }
}
