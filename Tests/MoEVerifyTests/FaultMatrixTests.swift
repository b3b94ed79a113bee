import Foundation
import KernelBridge
import MoEReference
@testable import MoEVerify
import Testing
import TensorIO
import MoECheckTestSupport

// The fault-detection matrix in CI: every CPU fault model against the small case families. The
// matrix is computed once per test process and shared by the tests below.

private let allFaults = CPUModelKernel.harmfulFaults + CPUModelKernel.benignVariants

private let smallFamilies = FaultMatrix.families(large: false)

/// The matrix over the CPU fault models (nil fault: the unfaulted model), or the error it threw.
private let cpuMatrix: Result<FaultMatrix, Error> = Result {
    try FaultMatrix.run(faults: allFaults, families: smallFamilies, makeKernel: { try CPUModelKernel(fault: $0) }, progress: { _ in })
}

private func matrix() throws -> FaultMatrix { try requireSuccess(cpuMatrix, "FaultMatrix.run with the CPU models") }

@Suite("Fault matrix with the CPU fault models (small families)")
struct FaultMatrixTests {
    @Test("the CPU models know exactly the fault build's names, harmful and benign (KernelFault)")
    func cpuModelFaultNames() {
        #expect(CPUModelKernel.harmfulFaults == KernelFault.harmful.map(\.rawValue))
        #expect(CPUModelKernel.benignVariants == KernelFault.benign.map(\.rawValue))
        #expect(KernelFault.allCases.allSatisfy { FaultMatrix.isBenign($0.rawValue) == $0.isBenign })
    }

    @Test("the matrix has one cell per fault and family")
    func shape() throws {
        let m = try matrix()
        #expect(m.faults == allFaults)
        #expect(m.families == smallFamilies.map(\.name))
        #expect(m.cells.count == allFaults.count * smallFamilies.count)
        #expect(!CPUModelKernel.harmfulFaults.contains { FaultMatrix.isBenign($0) }, "harmful fault names never start with benign_")
        #expect(CPUModelKernel.benignVariants.allSatisfy { FaultMatrix.isBenign($0) })
    }

    @Test("the unfaulted baseline passes every family")
    func baselinePasses() throws {
        let m = try matrix()
        #expect(m.baselineFailures.isEmpty, "baseline failures:\n\(m.baselineFailures.joined(separator: "\n"))")
    }

    @Test("every harmful fault is detected by at least one family", arguments: CPUModelKernel.harmfulFaults)
    func harmfulFaultDetected(_ fault: String) throws {
        let m = try matrix()
        let cells = m.cells.filter { $0.fault == fault }
        #expect(cells.count == smallFamilies.count, "\(fault): \(cells.count) cells")
        #expect(cells.contains { $0.flagged }, "\(fault) was missed by every family:\n\(m.table)")
        for c in cells where c.flagged {
            #expect(!c.evidence.isEmpty, "\(fault) on \(c.family): flagged without evidence")
        }
        #expect(!m.missed.contains(fault))
    }

    @Test("every benign variant passes every family", arguments: CPUModelKernel.benignVariants)
    func benignVariantAccepted(_ variant: String) throws {
        let m = try matrix()
        for c in m.cells where c.fault == variant {
            #expect(!c.flagged, "false alarm: benign \(variant) flagged on \(c.family): \(c.evidence)")
        }
    }

    @Test("the matrix as a whole passes")
    func matrixPasses() throws {
        let m = try matrix()
        #expect(m.passed, "missed: \(m.missed), false alarms: \(m.falseAlarms.map { "\($0.fault) on \($0.family)" })\n\(m.table)")
        #expect(m.missed.isEmpty && m.falseAlarms.isEmpty)
    }

    @Test("the text table marks detections, benign acceptances and names the families")
    func table() throws {
        let m = try matrix()
        let lines = m.table.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("fault") == true && lines.first?.hasSuffix("verdict") == true, "header: \(lines.first ?? "")")
        for f in allFaults {
            let row = try #require(lines.first { $0.hasPrefix(f + " ") }, "no row for \(f) in\n\(m.table)")
            let marks = row.dropFirst(f.count).split(separator: " ").filter { $0 == "D" || $0 == "." }
            #expect(marks.count == smallFamilies.count, "\(f): row \(row)")
            let flagged = m.cells.filter { $0.fault == f }.map(\.flagged)
            #expect(marks.map { $0 == "D" } == flagged, "\(f): marks \(marks) disagree with the cells \(flagged)")
            if FaultMatrix.isBenign(f) {
                #expect(row.hasSuffix("accepted (benign)"), "\(f): \(row)")
            } else {
                #expect(row.hasSuffix("detected"), "\(f): \(row)")
            }
        }
        for (i, fam) in smallFamilies.enumerated() {
            #expect(lines.contains("F\(i + 1) = \(fam.name) (\(FaultMatrix.dataKind(fam)))"), "family legend F\(i + 1) with its data kind")
        }
        #expect(!m.table.contains("MISSED") && !m.table.contains("FALSE ALARM"))
    }

    @Test("the table says MISSED and FALSE ALARM when it should")
    func tableFlagsFailures() {
        let cells = [
            FaultMatrix.Cell(fault: "harmful_x", family: "A", data: "ordinary", flagged: false, tier: false ? "rigorous" : "-", evidence: ""),
            FaultMatrix.Cell(fault: "harmful_x", family: "B", data: "ordinary", flagged: false, tier: false ? "rigorous" : "-", evidence: ""),
            FaultMatrix.Cell(fault: "benign_y", family: "A", data: "ordinary", flagged: true, tier: true ? "rigorous" : "-", evidence: "stage1: out of bound"),
            FaultMatrix.Cell(fault: "benign_y", family: "B", data: "ordinary", flagged: false, tier: false ? "rigorous" : "-", evidence: ""),
        ]
        let m = FaultMatrix(families: ["A", "B"], faults: ["harmful_x", "benign_y"], cells: cells, baselineFailures: [])
        #expect(m.missed == ["harmful_x"])
        #expect(m.falseAlarms.map(\.family) == ["A"])
        #expect(!m.passed)
        #expect(m.table.contains("harmful_x") && m.table.contains("MISSED"), "\(m.table)")
        #expect(m.table.contains("FALSE ALARM"), "\(m.table)")
        let failingBaseline = FaultMatrix(families: ["A"], faults: [], cells: [], baselineFailures: ["FAIL A: stage2"])
        #expect(!failingBaseline.passed)
    }

    @Test("the matrix round-trips through JSON (moecheck faults --json)")
    func codable() throws {
        let m = try matrix()
        let back = try JSONDecoder().decode(FaultMatrix.self, from: JSONEncoder().encode(m))
        #expect(back.cells.map(\.flagged) == m.cells.map(\.flagged) && back.faults == m.faults && back.families == m.families)
    }
}
