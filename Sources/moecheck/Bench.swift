import ArgumentParser

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "(not yet available)")
    func run() throws { throw ToolFailure("moecheck bench: not implemented yet") }
}
